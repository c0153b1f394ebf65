"""Whole-model sparsity (`--targets attention|all`): every target at the exact count, the
reference protocol's inputs (dense block forward, or true-sequential), resume, the CLI."""

import dataclasses
import io
import json

import jax
import numpy as np
import pytest

from attnprune_jax import cli, evaluate, models, runs, settings
from attnprune_jax.models.llama import Llama
from attnprune_jax.pipeline import prune_model, sparsity_summary
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import model_fingerprint
from attnprune_jax.run_folder import RunFolder
from attnprune_jax.settings import SEQUENTIAL_GROUPS, TARGETS, Grid, PruneSettings, split_method
from attnprune_jax.solver_config import BlockSolverConfig, MaskSolverConfig
from conftest import SMALL_DATA, SMALL_WINDOWS, TINY_LLAMA
from experiments import qk_report, qk_share
from reference_numpy import binarize_rows, llama_forward

SMALL = MaskSolverConfig(steps=3, rounds=2, steps_per_round=3, reweight_steps=2,
                         windows_per_step=1)
SMALL_BLOCK = BlockSolverConfig(rounds=2, steps_per_round=3, reweight_steps=2,
                                windows_per_step=1)
ALL = TARGETS["all"]


def _settings(name, n_m=None, layers=(0, 2), **kwargs):
  method, rest, allocation = split_method(name)
  solver = (SMALL_BLOCK if method.startswith("attn-block") else
            SMALL if method.startswith("attn") else None)
  return PruneSettings(method, 0.5, n_m, layers, solver, targets="all", rest=rest,
                       allocation=allocation, **kwargs)


# 2:4 of Wanda and SparseGPT on the other targets is in the two combinations (and on q/k in
# test_pipeline).
@pytest.mark.parametrize("name,n_m", [
    (name, None) for name in ("magnitude", "wanda", "sparsegpt", "attn-progressive+wanda",
                              "attn-reweight+sparsegpt", "attn-block", "attn-block-reweight")] + [
    (name, (2, 4)) for name in ("magnitude", "attn-progressive+wanda", "attn-reweight+sparsegpt",
                                "attn-block-reweight")])
def test_every_target_at_the_exact_count_and_nothing_else_changed(tiny, name, n_m):
  model, calibration, heldout = tiny
  before = {k: np.array(v) for k, v in model.weights().items()}
  result = prune_model(model, _settings(name, n_m), calibration, heldout)
  assert set(result.weights) == set(ALL)  # embeddings, norms (and an LM head) are not replaced
  for key, value in model.weights().items():
    np.testing.assert_array_equal(value, before[key])  # nor is the model changed
  sparsegpt_rows = name.endswith("sparsegpt")
  for target in ALL:
    for layer in range(3):
      pruned = np.asarray(result.weights[target][layer])
      zero = pruned == 0
      if layer == 1:
        np.testing.assert_array_equal(pruned, before[target][layer])
      elif n_m is not None:
        assert (zero.reshape(zero.shape[0], -1, 4).sum(-1) == 2).all(), target
      elif sparsegpt_rows and target not in ("q_proj", "k_proj") or name == "sparsegpt":
        assert zero.sum() == zero.size // 2, target  # its mask is joint over rows, per block
      else:
        assert (zero.sum(-1) == zero.shape[1] // 2).all(), target
  summary = sparsity_summary(TINY_LLAMA, result.layers)
  assert summary["per_target"] == {target: 0.5 for target in ALL}
  assert summary["linear"] == pytest.approx(0.5 * 2 / 3, abs=1e-12)
  total = sum(v.size for v in before.values())
  linears = sum(before[t][0].size for t in ALL)
  assert summary["model"] == pytest.approx(2 * 0.5 * linears / total, abs=1e-12)


def _wanda_masks(weights, layer, calibration, protocol_weights):
  """numpy Wanda masks of `layer`'s linears from inputs of a float64 forward of
  `protocol_weights` (every window's tokens pooled)."""
  inputs = {}
  for window in calibration:
    captured = []
    llama_forward(protocol_weights, window, TINY_LLAMA, linear_inputs=captured)
    for target, x in captured[layer].items():
      inputs.setdefault(target, []).append(x)
  masks = {}
  for target, xs in inputs.items():
    norms = np.sqrt(np.sum(np.concatenate(xs) ** 2, axis=0))
    w = np.asarray(weights[target][layer], np.float64)
    masks[target] = binarize_rows(np.abs(w) * norms, w.shape[1] // 2)
  return masks


def _with_layer(dense, pruned, layer, targets):
  return {k: (np.array(v) if k not in targets else
              np.concatenate([v[:layer], np.asarray(pruned[k][layer:layer + 1]), v[layer + 1:]]))
          for k, v in dense.items()}


def test_every_linear_sees_the_dense_block_on_the_pruned_blocks_output(tiny):
  model, calibration, heldout = tiny
  dense = model.weights()
  result = prune_model(model, _settings("wanda", layers=(0, 1)), calibration, heldout)
  kept = lambda layer, target: np.asarray(result.weights[target][layer]) != 0
  for target, mask in _wanda_masks(dense, 0, calibration, dense).items():
    np.testing.assert_array_equal(kept(0, target), mask, err_msg=target)
  # Layer 1 from the output of layer 0 with all of its linears pruned.
  upstream = _with_layer(dense, result.weights, 0, ALL)
  expected = _wanda_masks(dense, 1, calibration, upstream)
  on_dense = _wanda_masks(dense, 1, calibration, dense)
  assert any((expected[t] != on_dense[t]).any() for t in ALL)  # the test can tell them apart
  for target, mask in expected.items():
    np.testing.assert_array_equal(kept(1, target), mask, err_msg=target)


def test_true_sequential_prunes_each_group_from_the_block_with_the_ones_before_pruned(tiny):
  model, calibration, heldout = tiny
  dense = model.weights()
  result = prune_model(model, _settings("wanda", layers=(0,), true_sequential=True),
                       calibration, heldout)
  together = prune_model(model, _settings("wanda", layers=(0,)), calibration, heldout)
  kept = lambda pruned, target: np.asarray(pruned.weights[target][0]) != 0
  done = ()
  for group in SEQUENTIAL_GROUPS:
    expected = _wanda_masks(dense, 0, calibration, _with_layer(dense, result.weights, 0, done))
    for target in group:
      np.testing.assert_array_equal(kept(result, target), expected[target], err_msg=target)
    done += group
  assert (kept(result, "down_proj") != kept(together, "down_proj")).any()
  np.testing.assert_array_equal(kept(result, "q_proj"), kept(together, "q_proj"))


def test_attention_targets_leave_the_mlp_dense(tiny):
  model, calibration, heldout = tiny
  result = prune_model(model, PruneSettings("magnitude", 0.5, None, (0,), targets="attention"),
                       calibration, heldout)
  assert set(result.weights) == set(TARGETS["attention"])
  summary = sparsity_summary(TINY_LLAMA, result.layers)
  assert set(summary["per_target"]) == set(TARGETS["attention"])


def test_prune_cli_whole_model_reports_sparsity_per_target(tiny_folder, tmp_path, capsys):
  out = tmp_path / "run"
  assert cli.main(["prune", "--model", str(tiny_folder), "--method", "attn-progressive",
                   "--rest", "wanda", "--targets", "all", "--pattern", "2:4", *SMALL_DATA,
                   "--rounds", "2", "--steps-per-round", "2", "--windows-per-step", "1",
                   "--out", str(out), "--save-weights"]) == 0
  row = json.loads((out / "results.json").read_text())
  assert row["method"] == "attn-progressive+wanda" and row["targets"] == "all"
  assert row["removed"]["per_target"] == {target: 0.5 for target in ALL}
  assert row["removed"]["linear"] == 0.5
  assert "down_proj 50.00 %" in capsys.readouterr().err
  saved, dense = models.load(out / "model").weights(), models.load(tiny_folder).weights()
  np.testing.assert_array_equal(saved["embed_tokens"], dense["embed_tokens"])
  for target in ALL:
    zero = np.asarray(saved[target]) == 0
    assert (zero.reshape(*zero.shape[:2], -1, 4).sum(-1) == 2).all(), target


@pytest.mark.slow  # the default tier: reproduce of q/k rows (test_pipeline), the whole-model prune
def test_reproduce_targets_all_runs_the_comparisons_resumably(tiny_folder, tmp_path,
                                                              monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  real = settings.reproduce_grid
  monkeypatch.setattr(settings, "reproduce_grid", lambda *a: dataclasses.replace(
      real(*a), data=SMALL_WINDOWS))
  argv = ["reproduce", "--model", str(tiny_folder), "--quick", "--targets", "all", "--methods",
          "wanda", "magnitude", "--quiet"]
  assert cli.main(argv) == 0
  path = tmp_path / "out/models/model-quick/whole_model.json"
  stored = json.loads(path.read_text())
  assert stored["kind"] == "whole-model" and stored["targets"] == "all"
  assert [(r["method"], r["sparsity"]) for r in stored["rows"]] == [
      ("dense", 0.0), ("wanda", 0.5), ("magnitude", 0.5)]
  assert all(r["removed"]["linear"] == 0.5 for r in stored["rows"][1:])
  monkeypatch.setattr(runs, "prune_row", lambda *a, **k: pytest.fail("recomputed"))
  assert cli.main(argv) == 0  # resumed: every row stored
  tables = path.with_suffix(".md").read_text()
  assert "removed: decoder linears" in tables and "50.00 %" in tables
  # The q/k and MLP shares: the wanda row re-evaluated with dense q/k, then dense MLP.
  share = tmp_path / "share.json"
  qk_share.main(["--model", str(tiny_folder), "--results", str(path), "--work",
                 "out/models/model-quick/work/whole_model", "--out", str(share), "--methods",
                 "wanda", "--restore", "qk", "mlp", "--quiet"])
  [entry] = json.loads(share.read_text())["rows"]
  model = models.load(tiny_folder)
  wanda_row = stored["rows"][1]
  pruned = RunFolder(tmp_path / "out/models/model-quick/work/whole_model/all-wanda-0.5"
                     ).finished_weights(model, model_fingerprint(model))
  evaluation = runs.token_windows(model, SMALL_WINDOWS)["evaluation"]
  for family, names in (("qk", ("q_proj", "k_proj")),
                        ("mlp", ("gate_proj", "up_proj", "down_proj"))):
    weights = pruned | {name: model.weights()[name] for name in names}
    assert entry[f"perplexity_dense_{family}"] == pytest.approx(evaluate.perplexity(
        model, evaluation, weights=weights)["perplexity"], rel=1e-6)
    assert entry["perplexity"] == wanda_row["perplexity"] != entry[f"perplexity_dense_{family}"]
    assert entry[f"{family}_cost"] == pytest.approx(
        wanda_row["perplexity"] - entry[f"perplexity_dense_{family}"])
  capsys.readouterr()
  assert cli.main(["reproduce", "--model", str(tiny_folder), "--targets", "all", "--methods",
                   "attn-progressive", "--quiet"]) == 2
  assert "reproduce --methods METHOD+BASELINE" in capsys.readouterr().err
  # The rows of one kind of targets are never mixed with (or overwritten by) another's.
  assert cli.main(["reproduce", "--model", str(tiny_folder), "--quick", "--results", str(path),
                   "--report-only", "--quiet"]) == 2
  assert "--results: " in capsys.readouterr().err
  with pytest.raises(ValueError, match="holds rows of targets 'all', not 'qk'"):
    runs.reproduce(models.load(tiny_folder), Grid(layers=(0,), data=SMALL_WINDOWS), path,
                   tmp_path / "w", reporter=Reporter(quiet=True))


def test_unfinished_or_unreadable_checkpoints_are_not_used(tiny, tmp_path):
  model, calibration, heldout = tiny
  prune = _settings("wanda", layers=(0, 2))
  folder, key = RunFolder(tmp_path), model_fingerprint(model)
  whole = prune_model(model, prune, calibration, heldout, folder=folder)
  state = json.loads((tmp_path / "checkpoint.json").read_text())
  other = Llama.random(TINY_LLAMA, jax.random.key(5))
  assert folder.finished_weights(other, model_fingerprint(other)) is None  # another model's
  (tmp_path / "checkpoint.json").write_text(json.dumps(state | {"layers": state["layers"][:1]}))
  assert folder.finished_weights(model, key) is None  # layer 2 not finished
  (tmp_path / "layer-000.npz").write_bytes(b"")  # truncated
  (tmp_path / "checkpoint.json").write_text(json.dumps(state))
  assert folder.finished_weights(model, key) is None
  stream = io.StringIO()
  again = prune_model(model, prune, calibration, heldout, folder=folder,
                      reporter=Reporter(stream=stream))
  assert "a layer file cannot be read" in stream.getvalue()
  for target in ALL:
    np.testing.assert_array_equal(again.weights[target], whole.weights[target])


def test_whole_model_tables_and_figure(tmp_path):
  row = lambda method, ppl, pattern="unstructured": {
      "method": method, "pattern": pattern, "sparsity": 0.5, "perplexity": ppl,
      "attention_error_mean": 1.0, "prune_time_s": 1.0, "removed": {"linear": 0.5, "model": 0.4},
      "attention_error_per_layer": {"0": 1.0, "1": 2.0}}
  rows = [{"method": "dense", "pattern": "dense", "sparsity": 0.0, "perplexity": 10.0}] + [
      row("wanda", 14.0), row("attn-progressive+wanda", 12.0), row("wanda", 20.0, "2:4"),
      row("sparsegpt", 13.0), row("owl:wanda", 13.0),
      row("attn-block", 11.0) | {"kl_divergence": 0.25, "top1_agreement": 0.8}]
  rows[2]["attention_error_per_layer"] = {"0": 0.5, "1": 3.0}
  tables = qk_report.markdown_tables(rows, "all")
  assert "| Δppl `attn-progressive+wanda` / Wanda | 0.50 | – |" in tables
  assert "| Δppl `attn-block` / min(Wanda, OWL+Wanda) | 0.33 | – |" in tables  # 1 / (13 − 10)
  assert "| Δppl `attn-block-reweight` / min(SparseGPT, OWL+SparseGPT) | – | – |" in tables
  assert "| `attn-block` | 0.250 | not run |" in tables
  assert "| `wanda` | not stored | not stored |" in tables
  assert "| `attn-block` | 80.0 % | not run |" in tables
  assert "| `owl:wanda` | 13.00 (+3.00) | n/a |" in tables  # an allocation mixes N:M patterns
  assert "than `wanda` | 1/2 | – |" in tables
  path = qk_report.plot_whole_model(rows, tmp_path / "whole_model.png")
  assert path.stat().st_size > 10_000
