"""Copy the result tables into the documents that quote them, so that a quote never drifts.

A document quotes a results file between two markers:

    <!-- tables from results/whole_model.md -->               the whole file
    <!-- tables from results/whole_model.md: perplexity, check -->   only the tables whose
                                                              header's first cell starts so
    ...
    <!-- end of tables -->

The results files are written by `attnprune reproduce` (`--report-only` rewrites them from the
stored rows); this rewrites every quote from them. `tests/test_docs.py` fails while a quote
differs from its source.

    .venv/bin/python tools/sync_tables.py           # rewrite README.md, paper_repro.md, docs/
    .venv/bin/python tools/sync_tables.py --check   # exit 1 naming the stale quotes
"""

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "paper_repro.md", "docs/*.md")
QUOTE = re.compile(r"^<!-- tables from (?P<source>[^\s:]+)(?::(?P<tables>[^>]*))? -->\n"
                   r"(?P<body>.*?)^<!-- end of tables -->$", re.MULTILINE | re.DOTALL)


def selected(text: str, heads: list[str]) -> str:
  """The tables of `text` (blank-line separated blocks) whose first cell starts with a head."""
  blocks = [block for block in text.strip("\n").split("\n\n")
            if any(block.startswith(f"| {head}") for head in heads)]
  return "\n\n".join(blocks) + "\n"


def synced(document: str, root: Path = ROOT) -> str:
  """`document` with every quote replaced by its source's current tables."""
  def quote(match: re.Match) -> str:
    path = root / match["source"]
    if not path.is_file():
      raise FileNotFoundError(f"a quote names {match['source']}, which does not exist")
    text = path.read_text()
    if match["tables"]:
      text = selected(text, [head.strip() for head in match["tables"].split(",")])
    head = match.group(0).split("\n", 1)[0]
    return f"{head}\n{text.rstrip(chr(10))}\n<!-- end of tables -->"
  return QUOTE.sub(quote, document)


def documents(root: Path = ROOT) -> list[Path]:
  return sorted({path for pattern in DOCUMENTS for path in root.glob(pattern)})


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
  args = parser.parse_args(argv)
  stale = []
  for path in documents():
    text = path.read_text()
    new = synced(text)
    if new != text:
      stale.append(path.relative_to(ROOT))
      if not args.check:
        path.write_text(new)
  verb = "stale" if args.check else "rewritten"
  print(f"{verb}: {', '.join(map(str, stale))}" if stale else "every quoted table is current")
  return 1 if stale and args.check else 0


if __name__ == "__main__":
  sys.exit(main())
