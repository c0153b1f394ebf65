"""The documents' quoted result tables equal the results files they name (tools/sync_tables.py)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sync_tables", ROOT / "tools" / "sync_tables.py")
sync_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync_tables)


@pytest.mark.parametrize("path", sync_tables.documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_tables_are_current(path):
  text = path.read_text()
  assert text == sync_tables.synced(text), (
      f"{path.relative_to(ROOT)} quotes tables that differ from their results file: run "
      f".venv/bin/python tools/sync_tables.py")


def test_every_results_table_is_quoted_somewhere():
  quoted = {match["source"] for path in sync_tables.documents()
            for match in sync_tables.QUOTE.finditer(path.read_text())}
  assert {"results/qk_pruning.md", "results/whole_model.md",
          "results/gemma3_270m/qk_pruning.md"} <= quoted


def test_a_quote_is_rewritten_whole_or_by_table(tmp_path):
  (tmp_path / "r.md").write_text("Dense: 1.\n\n| perplexity | a |\n|---|---|\n| x | 2 |\n\n"
                                 "| KL | a |\n|---|---|\n| x | 3 |\n\n| check | a |\n|---|---|\n")
  document = ("intro\n<!-- tables from r.md: perplexity, check -->\nold\n<!-- end of tables -->\n"
              "mid\n<!-- tables from r.md -->\n<!-- end of tables -->\nend\n")
  assert sync_tables.synced(document, tmp_path) == (
      "intro\n<!-- tables from r.md: perplexity, check -->\n| perplexity | a |\n|---|---|\n"
      "| x | 2 |\n\n| check | a |\n|---|---|\n<!-- end of tables -->\nmid\n"
      "<!-- tables from r.md -->\nDense: 1.\n\n| perplexity | a |\n|---|---|\n| x | 2 |\n\n"
      "| KL | a |\n|---|---|\n| x | 3 |\n\n| check | a |\n|---|---|\n<!-- end of tables -->\nend\n")


def test_a_quote_of_a_missing_file_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.md"):
    sync_tables.synced("<!-- tables from nowhere.md -->\n<!-- end of tables -->\n", tmp_path)
