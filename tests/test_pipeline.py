"""Layer-sequential pruning (`pipeline.prune_model`): exact counts, re-propagation, per-layer
sparsity, resume from a `RunFolder`; the prune command, saving the pruned model, reproduce."""

import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnprune_jax import cli, evaluate, models, numerics, pipeline, runs, settings
from attnprune_jax.baselines import input_stats, wanda
from attnprune_jax.errors import DivergenceError, InputError
from attnprune_jax.models import huggingface
from attnprune_jax.models.llama import Llama, LlamaConfig
from attnprune_jax.pipeline import prune_model
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import model_fingerprint
from attnprune_jax.run_folder import RunFolder
from attnprune_jax.settings import Grid, PruneSettings
from attnprune_jax.solver_config import BlockSolverConfig, MaskSolverConfig
from conftest import SMALL_DATA, SMALL_WINDOWS, TINY_LLAMA, interrupt_on_call
from experiments import qk_report

CONFIG = TINY_LLAMA
SMALL = MaskSolverConfig(steps=3, rounds=2, steps_per_round=3, reweight_steps=2,
                         windows_per_step=1)


@pytest.fixture(scope="module")
def tiny():
  model = Llama.random(CONFIG, jax.random.key(0), scale=0.5)
  rng = np.random.default_rng(0)
  return model, rng.integers(0, 64, (2, 12)), rng.integers(0, 64, (2, 12))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "attn-progressive"])
@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_exact_counts_per_row_and_per_group(tiny, method, n_m):
  model, calibration, heldout = tiny
  settings = PruneSettings(method, 0.5, n_m, (0, 2), SMALL if method.startswith("attn") else None)
  result = prune_model(model, settings, calibration, heldout)
  dense = model.weights()
  for name in ("q_proj", "k_proj"):
    for layer in range(3):
      zero = np.asarray(result.weights[name][layer]) == 0
      if layer == 1:
        np.testing.assert_array_equal(result.weights[name][layer], dense[name][layer])
      elif n_m is None and method == "sparsegpt":  # its mask is joint over rows, per block
        assert zero.sum() == zero.size // 2
      elif n_m is None:
        assert (zero.sum(-1) == 8).all()
      else:
        assert (zero.reshape(zero.shape[0], -1, 4).sum(-1) == 2).all()
  records = result.layers
  assert [r["pruned"] for r in records] == [True, False, True]
  assert records[1]["attention_error"] < 1e-12 < records[0]["attention_error"]
  assert records[2]["attention_error_end_to_end"] > 0


def test_each_layer_sees_the_pruned_output_of_the_layers_before(tiny):
  model, calibration, heldout = tiny
  result = prune_model(model, PruneSettings("wanda", 0.5, None, (0, 1)), calibration, heldout)
  first = {"q_proj": model.weights()["q_proj"].at[0].set(result.weights["q_proj"][0]),
           "k_proj": model.weights()["k_proj"].at[0].set(result.weights["k_proj"][0])}
  _, pruned_inputs = model(calibration, weights=first, return_attention_inputs=True)
  _, dense_inputs = model(calibration, return_attention_inputs=True)
  q1 = model.weights()["q_proj"][1]

  def wanda_q(inputs):
    x = inputs["attention_inputs"][1].reshape(-1, CONFIG.hidden_size)
    return np.asarray(wanda(q1, input_stats(x, gram=False), 0.5))

  expected = wanda_q(pruned_inputs)
  assert (expected != wanda_q(dense_inputs)).any()  # the test can tell the two apart
  np.testing.assert_array_equal(np.asarray(result.weights["q_proj"][1]) != 0, expected)


@pytest.mark.parametrize("prune", [
    PruneSettings("attn-reweight", 0.5, None, (0, 1, 2), SMALL, targets="all", rest="sparsegpt"),
    # The dense teacher stream is rebuilt on resuming,
    PruneSettings("attn-block-reweight", 0.5, None, (0, 1, 2),
                  BlockSolverConfig(rounds=2, steps_per_round=3, reweight_steps=2,
                                    windows_per_step=1), targets="all"),
    # and so are the OWL sparsities.
    PruneSettings("wanda", 0.5, None, (0, 1, 2), targets="all", allocation="owl")],
    ids=["attn-reweight+sparsegpt", "attn-block-reweight", "owl:wanda"])
def test_resume_after_an_interruption_gives_identical_results(tiny, tmp_path, monkeypatch,
                                                               prune):
  model, calibration, heldout = tiny
  whole = prune_model(model, prune, calibration, heldout)
  interrupt_on_call(monkeypatch, pipeline, "_prune_block", 2)
  with pytest.raises(KeyboardInterrupt):
    prune_model(model, prune, calibration, heldout, folder=RunFolder(tmp_path))
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "layer-000.npz"]
  calls = []
  real = pipeline._prune_block
  monkeypatch.setattr(pipeline, "_prune_block", lambda *a: calls.append(a[1]) or real(*a))
  resumed = prune_model(model, prune, calibration, heldout, folder=RunFolder(tmp_path))
  assert calls == [1, 2]  # layer 0 came from the checkpoint
  for name in settings.TARGETS["all"]:
    np.testing.assert_array_equal(resumed.weights[name], whole.weights[name])
  strip = lambda records: [{k: v for k, v in r.items() if k != "prune_time_s"} for r in records]
  assert strip(resumed.layers) == strip(whole.layers)
  stored = RunFolder(tmp_path).finished_weights(model, model_fingerprint(model))
  for name in settings.TARGETS["all"]:
    np.testing.assert_array_equal(stored[name], whole.weights[name])
  for other in [dict(settings=PruneSettings("wanda", 0.5, None, (0, 1, 2))),
                dict(calibration=calibration[:, ::-1]), dict(heldout=heldout[::-1]),
                dict(model=Llama.random(CONFIG, jax.random.key(9), scale=0.5))]:
    arguments = dict(model=model, settings=prune, calibration=calibration,
                     heldout=heldout) | other
    with pytest.raises(ValueError, match="other settings, calibration data or model"):
      prune_model(**arguments, folder=RunFolder(tmp_path))
  # A checkpoint of another numerics version is discarded, whatever else it was made with.
  monkeypatch.setattr(numerics, "PRUNING", numerics.PRUNING + 1)
  stream = io.StringIO()
  prune_model(model, PruneSettings("wanda", 0.7, None, (0,)), calibration, heldout,
              folder=RunFolder(tmp_path), reporter=Reporter(stream=stream))
  assert "numerics version" in stream.getvalue() and len(calls) == 3


def test_non_finite_solver_output_is_an_error_naming_the_layer(tiny):
  model, calibration, heldout = tiny
  diverging = MaskSolverConfig(optimizer="sgd", lr=1e30, rounds=2, steps_per_round=3,
                               windows_per_step=1)
  with pytest.raises(DivergenceError, match=r"layer 0: attn-reweight diverged: .* lr=1e\+30"):
    prune_model(model, PruneSettings("attn-reweight", 0.5, None, (0,), diverging), calibration,
                heldout)


def test_a_sparsity_per_layer_keeps_exact_counts_and_nothing_runs_past_the_last_layer(tiny):
  model, calibration, heldout = tiny
  result = prune_model(model, PruneSettings("wanda", (0.25, 0.75), None, (0, 1)), calibration,
                       heldout)
  kept = {layer: (np.asarray(result.weights["q_proj"][layer]) != 0).sum(-1) for layer in (0, 1)}
  assert (kept[0] == 12).all() and (kept[1] == 4).all()  # of 16 per row
  assert [r["layer"] for r in result.layers] == [0, 1]  # layer 2 changes nothing
  assert [r["sparsity"] for r in result.layers] == [0.25, 0.75]
  removed = pipeline.sparsity_summary(CONFIG, result.layers)
  assert removed["per_target"]["q_proj"] == pytest.approx(0.5)


# The command with an attention-aware method and a pattern: test_whole_model.
@pytest.mark.parametrize("method,extra", [("wanda", ["--sparsity", "0.5"])])
def test_prune_cli_writes_results_and_a_loadable_model(tiny_folder, tmp_path, method, extra):
  out = tmp_path / "run"
  argv = ["prune", "--model", str(tiny_folder), "--method", method, *extra, *SMALL_DATA,
          "--out", str(out), "--save-weights", "--quiet"]
  assert cli.main(argv) == 0
  row = json.loads((out / "results.json").read_text())
  assert row["kind"] == "prune" and row["method"] == method
  assert row["sparsity"] == 0.5 and row["pattern"] == ("2:4" if "--pattern" in extra
                                                       else "unstructured")
  assert set(row["attention_error_per_layer"]) == {"0", "1"}
  assert row["attention_error_mean"] > 0 and row["kept_fraction"] == 0.5
  assert row["provenance"]["git_commit"] is not None and row["prune_time_s"] > 0
  saved = models.load(out / "model")
  evaluation = runs.token_windows(saved, SMALL_WINDOWS)["evaluation"]
  assert evaluate.perplexity(saved, evaluation)["perplexity"] == pytest.approx(
      row["perplexity"], rel=1e-6)
  dense = models.load(tiny_folder)
  assert not jnp.allclose(saved.weights()["q_proj"], dense.weights()["q_proj"])


def test_reproduce_is_resumable_row_by_row_and_plots(tiny_folder, tmp_path, monkeypatch):
  model = models.load(tiny_folder)
  grid = Grid(sparsities=("0.5", "2:4"), methods=("wanda", "magnitude"), layers=(0, 1),
              data=SMALL_WINDOWS)
  results = tmp_path / "results.json"
  rows = runs.reproduce(model, grid, results, tmp_path / "work", reporter=Reporter(quiet=True),
                        tables=qk_report.markdown_tables)
  assert [(r["method"], r["pattern"], r["sparsity"]) for r in rows] == [
      ("dense", "dense", 0.0), ("wanda", "unstructured", 0.5),
      ("magnitude", "unstructured", 0.5), ("wanda", "2:4", 0.5), ("magnitude", "2:4", 0.5)]
  assert all(r["provenance"]["git_commit"] for r in rows)
  stored = json.loads(results.read_text())
  assert stored["kind"] == "qk-pruning" and len(stored["rows"]) == 5
  tables = results.with_suffix(".md").read_text()
  wanda_05 = rows[1]["perplexity"]
  assert f"| `wanda` | {wanda_05:.2f} (+{wanda_05 - rows[0]['perplexity']:.2f})" in tables

  def fail(*args, **kwargs):
    raise AssertionError("a finished row was recomputed")

  monkeypatch.setattr(runs, "prune_row", fail)
  monkeypatch.setattr(runs, "dense_row", fail)
  again = runs.reproduce(model, grid, results, tmp_path / "work", reporter=Reporter(quiet=True))
  assert again == rows
  # A grid of part of the methods reuses its rows and keeps the others.
  part = dataclasses.replace(grid, methods=("wanda",), sparsities=("2:4",))
  assert runs.reproduce(model, part, results, tmp_path / "work",
                        reporter=Reporter(quiet=True)) == rows
  # Rows of another numerics version are computed again, not reused.
  monkeypatch.setattr(numerics, "PRUNING", numerics.PRUNING + 1)
  with pytest.raises(AssertionError, match="a finished row was recomputed"):
    runs.reproduce(model, grid, results, tmp_path / "work", reporter=Reporter(quiet=True))
  paths = qk_report.plot(rows, tmp_path / "figures")
  assert [p.name for p in paths] == ["perplexity.png", "attention_error_per_layer.png",
                                     "prune_time.png"]
  assert all(p.stat().st_size > 10_000 for p in paths)
  # Nor are rows of another model with the same windows (e.g. a pruned copy of it).
  monkeypatch.undo()
  other = Llama(model.config, model.weights() | {"norm": model.weights()["norm"] * 2},
                model.tokenizer)
  monkeypatch.setattr(runs, "dense_row", fail)
  with pytest.raises(AssertionError, match="a finished row was recomputed"):
    runs.reproduce(other, grid, results, tmp_path / "work", reporter=Reporter(quiet=True))


def test_reproduce_cli_on_another_model_keeps_its_rows_apart(tiny_folder, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  real = settings.reproduce_grid
  monkeypatch.setattr(settings, "reproduce_grid", lambda *a: dataclasses.replace(
      real(*a), data=SMALL_WINDOWS))
  assert cli.main(["reproduce", "--model", str(tiny_folder), "--quick", "--methods", "wanda",
                   "--quiet"]) == 0
  stored = json.loads((tmp_path / "out/models/model-quick/qk_pruning.json").read_text())
  assert stored["layers"] == [0, 1]  # quick_layers of a 2-layer model
  assert [row["method"] for row in stored["rows"]] == ["dense", "wanda"]
  assert not (tmp_path / "results").exists() and not (tmp_path / "out/quick").exists()


def test_windows_longer_than_the_model_handles_are_refused(tmp_path, capsys, smollm2):
  config = LlamaConfig(vocab_size=smollm2.tokenizer.vocab_size, hidden_size=8,
                       intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                       head_dim=4, rope_base=1e4, rms_eps=1e-5, max_positions=32)
  huggingface.write_folder(tmp_path / "short", config, Llama.random(
      config, jax.random.key(0)).weights(), smollm2.tokenizer)
  assert cli.main(["eval", "--model", str(tmp_path / "short"), "--ctx", "33", "--tokens", "66",
                   "--quiet"]) == 2
  assert "windows of 33 tokens; the model handles at most 32" in capsys.readouterr().err
  assert cli.main(["eval", "--model", str(tmp_path / "short"), "--ctx", "32", "--tokens", "64",
                   "--quiet"]) == 0


@pytest.mark.parametrize("which,windows,message", [
    ("calibration", np.zeros((0, 8), np.int32), "calibration must be integer token windows"),
    ("heldout", np.zeros((2, 8)), "heldout must be integer token windows"),
    ("calibration", np.full((2, 8), 10**6), r"calibration must be token ids in \[0, "),
    ("heldout", np.full((1, 8), -1), r"heldout must be token ids in \[0, "),
])
def test_bad_windows_are_named(tiny, which, windows, message):
  model, calibration, heldout = tiny
  arguments = {"calibration": calibration, "heldout": heldout, which: windows}
  with pytest.raises(InputError, match=message):
    prune_model(model, PruneSettings("wanda", 0.5, None, (0,)), **arguments)
