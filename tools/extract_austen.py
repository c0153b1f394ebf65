"""Extract two Jane Austen novels from Debian's r-cran-janeaustenr into package data.

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb deb
    python tools/extract_austen.py deb/usr/lib/R/site-library/janeaustenr/data

The package's text lives in an R lazy-load database (data/Rdata.rdx, an index, and
data/Rdata.rdb, compressed R serializations of one character vector per novel, one Gutenberg
line per element). This script reads R's XDR serialization format itself (no R needed),
normalizes the text (paragraphs joined on blank lines, whitespace collapsed, `_` emphasis marks
dropped; one paragraph per line) and writes attnprune_jax/data/<novel>.txt.gz. The text is in the
public domain; the Debian package is MIT-licensed.
"""

import argparse
import bz2
import gzip
import lzma
import re
import struct
import zlib
from pathlib import Path

NOVELS = {"emma": "emma", "prideprejudice": "prideprejudice"}
OUT_DIR = Path(__file__).resolve().parent.parent / "attnprune_jax" / "data"

NILVALUE, REFSXP, ALTREP = 254, 255, 238
SPECIAL_ENVIRONMENTS = {242, 241, 253, 252, 251, 247}  # empty/base/global env, unbound, ...
SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, RAWSXP = 9, 10, 13, 14, 16, 19, 24


class RReader:
  """A reader of R's XDR ('X\\n') serialization, for the data types a lazy-load DB holds."""

  def __init__(self, data: bytes):
    if data[:2] != b"X\n":
      raise ValueError("not an XDR R serialization")
    self.data, self.pos, self.refs = data, 2, []
    version = self.int()
    self.int(), self.int()
    if version == 3:
      encoding_length = self.int()  # then the native encoding's name
      self.pos += encoding_length

  def int(self) -> int:
    (value,) = struct.unpack_from(">i", self.data, self.pos)
    self.pos += 4
    return value

  def length(self) -> int:
    n = self.int()
    if n == -1:
      upper, lower = self.int(), self.int()
      n = (upper << 32) + lower
    return n

  def item(self):
    flags = self.int()
    kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
    if kind == NILVALUE or kind in SPECIAL_ENVIRONMENTS:
      return None
    if kind == REFSXP:
      index = flags >> 8 or self.int()
      return self.refs[index - 1]
    if kind == SYMSXP:
      symbol = ("symbol", self.item())
      self.refs.append(symbol)
      return symbol
    if kind == ENVSXP:
      env: dict = {}
      self.refs.append(env)
      self.int()
      env.update(enclos=self.item(), frame=self.item(), hashtab=self.item(), attr=self.item())
      return env
    if kind in (LISTSXP, LANGSXP, CLOSXP, PROMSXP):
      attr = self.item() if has_attr else None
      tag = self.item() if has_tag else None
      head, tail = self.item(), self.item()
      return ("pairlist", tag, head, tail, attr)
    if kind == ALTREP:
      _info, state, _attributes = self.item(), self.item(), self.item()
      return state
    if kind == CHARSXP:
      n = self.int()
      if n == -1:
        return None
      text = self.data[self.pos:self.pos + n].decode("utf-8" if flags & (1 << 3) else "latin-1")
      self.pos += n
      return text
    if kind in (LGLSXP, INTSXP):
      n = self.length()
      values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
      self.pos += 4 * n
    elif kind == REALSXP:
      n = self.length()
      values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
      self.pos += 8 * n
    elif kind in (STRSXP, VECSXP):
      values = [self.item() for _ in range(self.length())]
    elif kind == RAWSXP:
      n = self.length()
      values = self.data[self.pos:self.pos + n]
      self.pos += n
    else:
      raise ValueError(f"unsupported R type {kind}")
    attributes = self.item() if has_attr else None
    return values if attributes is None else ("with_attributes", values, attributes)


def decompress(blob: bytes) -> bytes:
  """A lazy-load DB record: 4-byte length, then zlib (or a type byte and bzip2/xz data)."""
  body = blob[4:]
  if body[:1] == b"2":
    return bz2.decompress(body[1:])
  if body[:1] == b"X":
    return lzma.decompress(body[1:])
  if body[:1] == b"0":
    return body[1:]
  return zlib.decompress(body)


def read_rds(blob: bytes) -> bytes:
  """The serialization inside an .rds/.rdx file (gzip, bzip2 or xz compressed, or plain)."""
  if blob[:2] == b"\x1f\x8b":
    return gzip.decompress(blob)
  if blob[:3] == b"BZh":
    return bz2.decompress(blob)
  if blob[:6] == b"\xfd7zXZ\x00":
    return lzma.decompress(blob)
  return blob


def pairlist_to_dict(pairlist) -> dict:
  out = {}
  while pairlist is not None:
    _, tag, head, tail, _ = pairlist
    out[tag[1]] = head
    pairlist = tail
  return out


def read_lazy_load_db(directory: Path) -> dict[str, list]:
  """{variable name: value} of data/Rdata.rdx + Rdata.rdb."""
  index = RReader(read_rds((directory / "Rdata.rdx").read_bytes())).item()
  values, attributes = index[1], pairlist_to_dict(index[2])
  fields = dict(zip(attributes["names"], values))
  variables = fields["variables"]
  offsets, names = variables[1], pairlist_to_dict(variables[2])["names"]
  db = (directory / "Rdata.rdb").read_bytes()
  out = {}
  for name, (start, size) in zip(names, offsets):
    out[name] = RReader(decompress(db[int(start):int(start) + int(size)])).item()
  return out


def normalize(lines: list[str | None]) -> list[str]:
  """Paragraphs: lines joined on blank lines, whitespace collapsed, `_` emphasis dropped."""
  paragraphs, current = [], []
  for line in lines:
    line = (line or "").replace("_", "").strip()
    if line:
      current.append(line)
    elif current:
      paragraphs.append(re.sub(r"\s+", " ", " ".join(current)))
      current = []
  if current:
    paragraphs.append(re.sub(r"\s+", " ", " ".join(current)))
  return paragraphs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("data_dir", type=Path, help="janeaustenr/data of the extracted package")
  parser.add_argument("--out", type=Path, default=OUT_DIR)
  args = parser.parse_args()
  variables = read_lazy_load_db(args.data_dir)
  for variable, name in NOVELS.items():
    lines = variables[variable]
    if isinstance(lines, tuple):
      lines = lines[1]
    paragraphs = normalize(lines)
    target = args.out / f"{name}.txt.gz"
    with gzip.GzipFile(target, "wb", mtime=0) as handle:
      handle.write(("\n".join(paragraphs) + "\n").encode("utf-8"))
    print(f"{target}: {len(paragraphs)} paragraphs, {sum(map(len, paragraphs))} characters")


if __name__ == "__main__":
  main()
