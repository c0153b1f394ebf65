"""Result files: atomic writes, provenance naming the commit, fingerprints of the code."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attnprune_jax import results
from attnprune_jax.results import code_fingerprint, provenance, write_json_atomic


def test_write_replaces_and_failed_write_keeps_old_file(tmp_path):
  path = tmp_path / "r.json"
  write_json_atomic(path, {"a": 1})
  write_json_atomic(path, {"a": 2})
  assert json.loads(path.read_text()) == {"a": 2}
  with pytest.raises(TypeError):
    write_json_atomic(path, {"a": object()})
  assert json.loads(path.read_text()) == {"a": 2}
  assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def _in_git_checkout() -> bool:
  root = Path(results.__file__).resolve().parent.parent
  try:
    return subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root,
                          capture_output=True, text=True).stdout.strip() == "true"
  except OSError:
    return False


def test_provenance_names_code_and_versions():
  record = provenance(seed=3, settings={"k": 1}, wall_time_s=0.5)
  if _in_git_checkout():
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", record["git_commit"] or "")
  else:
    assert record["git_commit"] is None
  assert record["seed"] == 3 and record["settings"] == {"k": 1}
  assert set(record["versions"]) >= {"jax", "jaxlib", "optax", "numpy", "python"}


def test_code_fingerprint_follows_the_source(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(tmp_path))
  (tmp_path / "fp_module.py").write_text("A = 1\n")
  (tmp_path / "fp_package").mkdir()
  (tmp_path / "fp_package" / "__init__.py").write_text("")
  (tmp_path / "fp_package" / "part.py").write_text("B = 1\n")
  fp_module = importlib.import_module("fp_module")
  first = code_fingerprint(["fp_module", "fp_package"])
  assert re.fullmatch(r"[0-9a-f]{16}", first)
  assert code_fingerprint([sys.modules["fp_package"], fp_module, "fp_module"]) == first
  (tmp_path / "fp_module.py").write_text("A = 2\n")
  second = code_fingerprint(["fp_module", "fp_package"])
  (tmp_path / "fp_package" / "part.py").write_text("B = 2\n")
  assert len({first, second, code_fingerprint(["fp_module", "fp_package"])}) == 3
  with pytest.raises(TypeError, match="source file"):  # a developer's bug, not bad input
    code_fingerprint([sys])
