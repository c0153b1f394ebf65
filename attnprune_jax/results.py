"""Result files: plain JSON with a schema version and provenance, written atomically."""

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from attnprune_jax.errors import InputError

SCHEMA_VERSION = 1
_PACKAGES = ("attnprune_jax", "jax", "jaxlib", "optax", "flax", "numpy")


def git_commit() -> str | None:
  """HEAD of the checkout holding this package, with '-dirty' if it has local changes."""
  root = Path(__file__).resolve().parent.parent
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True, check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, check=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("-dirty" if dirty.strip() else "")


def fingerprint(*arrays) -> str:
  """A SHA-256 of arrays' shapes, dtypes and bytes: what a stored result was computed from."""
  digest = hashlib.sha256()
  for array in arrays:
    array = np.ascontiguousarray(np.asarray(array))
    digest.update(f"{array.shape}{array.dtype}".encode())
    digest.update(array.reshape(-1).view(np.uint8))  # the bytes, hashed in place: no copy
  return digest.hexdigest()


def config_text(config) -> str:
  """A dataclass config as a stored result's key reads it: its repr, less the fields outside
  the class's KEYED_FIELDS (if it names them) that hold their defaults. A field added later
  with a default that computes what the code computed before leaves every stored key valid: a
  new architecture option costs no recomputation of the old results."""
  keyed = getattr(config, "KEYED_FIELDS", None)
  shown = [field for field in dataclasses.fields(config) if field.repr and (
      keyed is None or field.name in keyed or getattr(config, field.name) != field.default)]
  return (f"{type(config).__qualname__}("
          + ", ".join(f"{field.name}={getattr(config, field.name)!r}" for field in shown) + ")")


def model_fingerprint(model) -> str:
  """A SHA-256 of a model's architecture (`config_text` of its config, RoPE scaling included)
  and weights: what a stored result was computed from. Hashing SmolLM2 takes about a second:
  compute it once per job."""
  weights = model.weights()
  return fingerprint(np.frombuffer(config_text(model.config).encode(), np.uint8),
                     *(weights[name] for name in sorted(weights)))


# Instruction-set extensions that change how XLA's CPU code sums in float32 (vector width, fused
# multiply-add): long solves on machines that differ in them agree only to about 1 %.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
  """The processor's model name and its vector extensions among _ISA_FLAGS (from Linux's
  `cpuinfo`; elsewhere platform.processor()): which machines compute the same float32 numbers."""
  try:
    info = cpuinfo.read_text()
  except OSError:
    return platform.processor() or platform.machine()
  fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
  fields = {key.strip(): value.strip() for key, value in fields.items()}
  flags = set(fields.get("flags", "").split())
  model = fields.get("model name", platform.machine())
  return " ".join([model, *(flag for flag in _ISA_FLAGS if flag in flags)])


def _version(package: str) -> str | None:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def provenance(*, seed: int | None, settings: dict, wall_time_s: float) -> dict:
  """What produced a result: code version, library versions, machine, seed, settings, time."""
  import jax
  return {
      "git_commit": git_commit(),
      "versions": {name: _version(name) for name in _PACKAGES} | {
          "python": platform.python_version()},
      "platform": platform.platform(),
      "cpu": cpu(),
      "jax_backend": jax.default_backend(),
      "devices": [str(device) for device in jax.devices()],
      "command": " ".join(sys.argv),
      "seed": seed,
      "settings": settings,
      "wall_time_s": wall_time_s,
      "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def result_document(kind: str, results: dict, provenance_record: dict) -> dict:
  """The JSON document of one command's results."""
  return {"schema_version": SCHEMA_VERSION, "kind": kind, "provenance": provenance_record,
          **results}


def check_output_path(option: str, path: str | os.PathLike, *, folder: bool = False) -> Path:
  """`path` as a Path if a command can write it (a file, or a folder if `folder`), else an
  InputError naming `option`; run before the work so that a bad path costs nothing.

  The nearest existing ancestor must be a folder in which a file can be created (tried with a
  nameless temporary file, so nothing is left behind); missing folders are created later.
  """
  text = os.fspath(path)
  kind = "folder" if folder else "file"
  if not text:
    raise InputError(f"{option} must be a {kind} path, got an empty string")
  path = Path(text)
  if folder and path.exists() and not path.is_dir():
    raise InputError(f"{option} must be a folder, got {text!r}, which is a file")
  if not folder and (path.is_dir() or text.endswith(os.sep)):
    raise InputError(f"{option} must be a file path, got {text!r}, which is a folder")
  if not folder and path.exists() and not path.is_file():
    raise InputError(f"{option} must be a regular file, got {text!r} (a device, pipe or socket)")
  ancestor = path if folder else path.parent
  for link in (path, *path.parents):
    if link.is_symlink() and not link.exists():
      raise InputError(f"{option}: cannot create {text!r}: {str(link)!r} is a symbolic link "
                       "to nothing (or to itself)")
  while not ancestor.exists() and ancestor != ancestor.parent:
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    raise InputError(f"{option}: cannot create {text!r}: {str(ancestor)!r} is a file, not a "
                     "folder")
  try:
    tempfile.TemporaryFile(dir=ancestor).close()
  except OSError as err:
    raise InputError(f"{option}: cannot write {text!r}: folder {str(ancestor)!r} is not "
                     f"writable ({err.strerror})") from None
  return path


def _non_finite(value, where: str) -> tuple[str, float] | None:
  """The key path (e.g. `rows[2].perplexity`) and value of the first NaN or infinity in a
  JSON-like value, or None."""
  if isinstance(value, float) and not math.isfinite(value):
    return where, value
  if isinstance(value, dict):
    children = ((f"{where}.{key}" if where else str(key), child) for key, child in value.items())
  elif isinstance(value, (list, tuple)):
    children = ((f"{where}[{index}]", child) for index, child in enumerate(value))
  else:
    children = ()
  for key, child in children:
    found = _non_finite(child, key)
    if found is not None:
      return found
  return None


def json_text(document: dict) -> str:
  """`document` as standard JSON text, indented, with a final newline.

  NaN and infinity are not JSON: a document holding one is a bug upstream, reported (ValueError
  naming the key) rather than written.
  """
  try:
    return json.dumps(document, indent=2, allow_nan=False) + "\n"
  except ValueError:
    found = _non_finite(document, "")
    if found is None:
      raise
    raise ValueError(f"{found[0]} is {found[1]}; NaN and infinity cannot be written as "
                     "JSON") from None


def read_json(path: str | os.PathLike):
  """The JSON value in the file `path`. Nesting is limited by Python's recursion limit: a
  deeper file raises a ValueError saying so (as a malformed one does), never a RecursionError."""
  text = Path(path).read_text(encoding="utf-8")
  try:
    return json.loads(text)
  except RecursionError:
    raise ValueError(f"nested more than {sys.getrecursionlimit()} levels deep") from None


def umask_mode(mode: int) -> int:
  """`mode` (e.g. 0o666 for a file, 0o777 for a folder) less the process's umask: the mode an
  ordinary `open` or `mkdir` would give. Temporary files are created private (0600), so what
  is renamed into place gets this mode explicitly."""
  try:  # Linux says it without changing it (os.umask would, for an instant, in every thread)
    with open("/proc/self/status", encoding="ascii") as status:
      mask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
  except (OSError, StopIteration, ValueError, IndexError):
    mask = os.umask(0o022)
    os.umask(mask)
  return mode & ~mask


def write_atomic(path: str | os.PathLike, write) -> None:
  """Calls write(binary handle) on a temporary file beside `path`, then renames it to `path`,
  so that a reader sees the old file or the new one, never half; a failed write leaves no
  temporary file behind. The file gets the mode the umask gives a new file (`umask_mode`)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                       delete=False)
  try:
    with handle:
      write(handle)
      handle.flush()
      os.fsync(handle.fileno())
    os.chmod(handle.name, umask_mode(0o666))
    os.replace(handle.name, path)
  except BaseException:
    Path(handle.name).unlink(missing_ok=True)
    raise


def write_json_atomic(path: str | os.PathLike, document: dict) -> None:
  """Writes `document` as standard JSON (see `json_text`) to `path` atomically (`write_atomic`)."""
  text = json_text(document).encode()
  write_atomic(path, lambda handle: handle.write(text))


def stored_rows(path: Path, targets: str) -> list[dict]:
  """The rows of a results file of `reproduce` for `targets`; an InputError naming `results`
  if it is not one."""
  try:
    document = read_json(path)
    rows = document["rows"]
  except (OSError, ValueError, TypeError, KeyError) as err:
    raise InputError(f"{path} is not a results file of reproduce ({type(err).__name__}: {err})",
                     argument="results") from None
  if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
    raise InputError(f"{path} holds no list of rows", argument="results")
  stored = document.get("targets", "qk")
  if stored != targets:
    raise InputError(f"{path} holds rows of targets {stored!r}, not {targets!r}; write them to "
                     "another file", argument="results")
  return rows


def cached_result(path: Path, settings: dict, numerics: int, compute):
  """The stored result at `path` if it was made with `settings` and the numerics version
  `numerics` (see `numerics`), else compute and store it with both and the git commit.

  Returns the result and the commit that stored it ("unknown" outside git), or None if computed
  now. A file that is not a stored result is moved aside to `<name>.damaged`, with a warning.
  """
  settings = json.loads(json.dumps(settings))
  if path.is_file():
    try:
      stored = read_json(path)
      if not (isinstance(stored, dict) and {"settings", "result"} <= stored.keys()):
        raise ValueError("no settings and result")
    except ValueError as err:
      damaged = path.with_name(f"{path.name}.damaged")
      path.replace(damaged)
      warnings.warn(f"{path} is not a stored result ({err}); moved it to "
                    f"{damaged.name} and computing it again", RuntimeWarning, stacklevel=2)
    else:
      if stored["settings"] == settings and stored.get("numerics") == numerics:
        return stored["result"], stored.get("git_commit") or "unknown"
  result = compute()
  write_json_atomic(path, {"settings": settings, "numerics": numerics,
                           "git_commit": git_commit(), "result": result})
  return result, None


def reuse_record(origins: list[str | None]) -> dict:
  """How many results `cached_result` reused (its second return values), by the commit that
  stored them."""
  commits = [origin for origin in origins if origin is not None]
  return {"count": len(commits), "commits": {c: commits.count(c) for c in sorted(set(commits))}}
