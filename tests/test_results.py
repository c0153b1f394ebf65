"""Result files: atomic writes, provenance naming the commit, fingerprints of what a result
was computed from, stored results reused by settings and numerics version."""

import dataclasses
import json
import re
import subprocess
from pathlib import Path
from typing import ClassVar

import jax
import pytest

from attnprune_jax import results
from attnprune_jax.attention import Llama3Scaling
from attnprune_jax.models.llama import Llama
from attnprune_jax.results import (cached_result, model_fingerprint, provenance, reuse_record,
                                   write_json_atomic)
from conftest import TINY_GEMMA, TINY_LLAMA


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
  assert record["cpu"] == results.cpu()


def test_cpu_names_the_model_and_the_vector_extensions(tmp_path):
  info = tmp_path / "cpuinfo"
  processor = ("processor\t: {}\nmodel name\t: Zen Test 9\n"
               "flags\t\t: fpu sse avx2 fma avx512f avx512_vnni\n\n")
  info.write_text(processor.format(0) + processor.format(1))
  assert results.cpu(info) == "Zen Test 9 avx2 fma avx512f"


def test_config_text_reads_later_fields_only_where_they_leave_their_defaults():
  @dataclasses.dataclass(frozen=True)
  class Config:  # `first` was there when results were first stored, `later` came after
    KEYED_FIELDS: ClassVar[tuple[str, ...]] = ("first", "optional")
    first: int
    optional: int | None = None
    later: str = "old behaviour"

  name = Config.__qualname__  # as the dataclass's repr names it
  assert results.config_text(Config(3)) == f"{name}(first=3, optional=None)"
  assert results.config_text(Config(3, later="new")) == (
      f"{name}(first=3, optional=None, later='new')")
  assert results.config_text(TINY_LLAMA) == (  # the Llama's key as before Gemma's fields
      "LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=3, "
      "num_heads=4, num_kv_heads=2, head_dim=4, rope_base=10000.0, rms_eps=1e-05, "
      "tie_embeddings=True, rope_scaling=None, max_positions=None)")
  assert "family='gemma3'" in results.config_text(TINY_GEMMA)


def test_model_fingerprint_covers_the_architecture_and_the_weights():
  model = Llama.random(TINY_LLAMA, jax.random.key(0))
  base = model_fingerprint(model)
  assert model_fingerprint(Llama(TINY_LLAMA, model.weights())) == base
  scaled = dataclasses.replace(TINY_LLAMA, rope_scaling=Llama3Scaling(8.0, 1.0, 4.0, 16))
  assert model_fingerprint(Llama(scaled, model.weights())) != base
  norm = model.weights()["norm"]
  assert model_fingerprint(Llama(TINY_LLAMA, model.weights() | {
      "norm": norm.at[0].add(1.0)})) != base


def test_stored_results_are_reused_for_the_same_settings_and_numerics_only(tmp_path):
  path, computed = tmp_path / "run.json", []
  compute = lambda: computed.append(1) or {"value": len(computed)}
  assert cached_result(path, {"a": 1}, 1, compute) == ({"value": 1}, None)
  result, origin = cached_result(path, {"a": 1}, 1, compute)
  assert result == {"value": 1} and origin and len(computed) == 1
  assert cached_result(path, {"a": 2}, 1, compute)[0] == {"value": 2}  # other settings
  assert cached_result(path, {"a": 2}, 2, compute)[0] == {"value": 3}  # other numerics
  assert reuse_record([None, origin, origin]) == {"count": 2, "commits": {origin: 2}}
  path.write_text("{not json")
  with pytest.warns(RuntimeWarning, match="not a stored result"):
    assert cached_result(path, {"a": 2}, 2, compute)[0] == {"value": 4}
  assert (tmp_path / "run.json.damaged").read_text() == "{not json"
