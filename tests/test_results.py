"""Result files are written atomically: a failed write leaves the old file and no debris."""

import json

import pytest

from attnprune_jax.results import provenance, write_json_atomic


def test_write_replaces_and_failed_write_keeps_old_file(tmp_path):
  path = tmp_path / "r.json"
  write_json_atomic(path, {"a": 1})
  write_json_atomic(path, {"a": 2})
  assert json.loads(path.read_text()) == {"a": 2}
  with pytest.raises(TypeError):
    write_json_atomic(path, {"a": object()})
  assert json.loads(path.read_text()) == {"a": 2}
  assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_provenance_names_code_and_versions():
  record = provenance(seed=3, settings={"k": 1}, wall_time_s=0.5)
  assert record["git_commit"] is None or len(record["git_commit"]) >= 40
  assert record["seed"] == 3 and record["settings"] == {"k": 1}
  assert set(record["versions"]) >= {"jax", "jaxlib", "optax", "numpy", "python"}
