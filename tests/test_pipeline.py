"""Layer-sequential q/k pruning: exact counts, re-propagation, resume, the prune CLI and
saving the pruned model."""

import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnprune_jax import cli, evaluate, models, pipeline
from attnprune_jax.attention import Llama3Scaling
from attnprune_jax.baselines import input_stats, wanda
from attnprune_jax.errors import DivergenceError, InputError
from attnprune_jax.layer_masks import MaskSolverConfig
from attnprune_jax.models import huggingface
from attnprune_jax.models.llama import Llama, LlamaConfig
from attnprune_jax.pipeline import PruneSettings, prune_model
from attnprune_jax.reporting import Reporter
from conftest import SMALL_DATA, SMALL_WINDOWS, TINY_LLAMA, interrupt_on_call
from experiments import qk_pruning, qk_report

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


def test_resume_after_an_interruption_gives_identical_results(tiny, tmp_path, monkeypatch):
  model, calibration, heldout = tiny
  settings = PruneSettings("attn-reweight", 0.5, None, (0, 1, 2), SMALL)
  whole = prune_model(model, settings, calibration, heldout)
  interrupt_on_call(monkeypatch, pipeline, "prune_qk", 2)
  with pytest.raises(KeyboardInterrupt):
    prune_model(model, settings, calibration, heldout, checkpoint_dir=tmp_path)
  monkeypatch.undo()
  resumed = prune_model(model, settings, calibration, heldout, checkpoint_dir=tmp_path)
  for name in ("q_proj", "k_proj"):
    np.testing.assert_array_equal(resumed.weights[name], whole.weights[name])
  strip = lambda records: [{k: v for k, v in r.items() if k != "prune_time_s"} for r in records]
  assert strip(resumed.layers) == strip(whole.layers)
  for other in [dict(settings=PruneSettings("wanda", 0.5, None, (0, 1, 2))),
                dict(calibration=calibration[:, ::-1]), dict(heldout=heldout[::-1]),
                dict(model=Llama.random(CONFIG, jax.random.key(9), scale=0.5))]:
    arguments = dict(model=model, settings=settings, calibration=calibration,
                     heldout=heldout) | other
    with pytest.raises(ValueError, match="other settings, calibration data or model"):
      prune_model(**arguments, checkpoint_dir=tmp_path)


def test_non_finite_solver_output_is_an_error_naming_the_layer(tiny):
  model, calibration, heldout = tiny
  diverging = MaskSolverConfig(optimizer="sgd", lr=1e30, rounds=2, steps_per_round=3,
                               windows_per_step=1)
  with pytest.raises(DivergenceError, match=r"layer 0: attn-reweight diverged: .* lr=1e\+30"):
    prune_model(model, PruneSettings("attn-reweight", 0.5, None, (0,), diverging), calibration,
                heldout)


def test_a_checkpoint_of_other_code_is_not_resumed(tiny, tmp_path, monkeypatch):
  model, calibration, heldout = tiny
  settings = PruneSettings("wanda", 0.5, None, (0, 1))
  prune_model(model, settings, calibration, heldout, checkpoint_dir=tmp_path)
  calls = []
  real = pipeline.prune_qk
  monkeypatch.setattr(pipeline, "prune_qk", lambda *a, **k: calls.append(1) or real(*a, **k))
  prune_model(model, settings, calibration, heldout, checkpoint_dir=tmp_path)
  assert calls == []  # same code: resumed, nothing recomputed
  monkeypatch.setattr(pipeline, "code_fingerprint", lambda modules: "other code")
  stream = io.StringIO()
  prune_model(model, settings, calibration, heldout, checkpoint_dir=tmp_path,
              reporter=Reporter(stream=stream))
  assert len(calls) == 2 and "made by other code" in stream.getvalue()
  # Other code and other settings (or a model fingerprinted differently by the other code):
  # replaced as well, not an error.
  monkeypatch.setattr(pipeline, "code_fingerprint", lambda modules: "yet other code")
  prune_model(model, PruneSettings("wanda", 0.7, None, (0, 1)), calibration, heldout,
              checkpoint_dir=tmp_path, reporter=Reporter(stream=stream))
  assert len(calls) == 4


def test_default_solver_settings_are_recorded():
  settings = PruneSettings("attn-progressive", 0.5, None, (0,))
  assert settings.to_json()["solver"]["lam"] == 3e-3
  assert PruneSettings("wanda", 0.5, None, (0,)).to_json()["solver"] is None


def test_settings_are_checked():
  with pytest.raises(ValueError, match="method must be one of"):
    PruneSettings("random", 0.5, None, (0,))
  with pytest.raises(ValueError, match="layers must be distinct"):
    PruneSettings("wanda", 0.5, None, (2, 1))
  with pytest.raises(ValueError, match="sparsity must be in"):
    PruneSettings("wanda", 1.5, None, (0,))


@pytest.mark.parametrize("method,extra", [
    ("wanda", ["--sparsity", "0.5"]),
    ("attn-progressive", ["--pattern", "2:4", "--rounds", "2", "--steps-per-round", "2",
                          "--windows-per-step", "1"])])
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
  evaluation = qk_pruning.windows(saved, qk_pruning.DataConfig(
      calib_seqs=2, calib_len=16, heldout_seqs=1, eval_tokens=64))["evaluation"]
  assert evaluate.perplexity(saved, evaluation)["perplexity"] == pytest.approx(
      row["perplexity"], rel=1e-6)
  dense = models.load(tiny_folder)
  assert not jnp.allclose(saved.weights()["q_proj"], dense.weights()["q_proj"])


@pytest.mark.parametrize("argv,message", [
    (["--method", "wanda"], "exactly one of --sparsity"),
    (["--method", "wanda", "--sparsity", "0.5", "--pattern", "2:4"], "exactly one of"),
    (["--method", "wanda", "--pattern", "2-4"], "--pattern must look like 2:4"),
    (["--method", "wanda", "--sparsity", "0.5", "--lr", "0.1"], "applies only to"),
    (["--method", "wanda", "--sparsity", "0.5", "--layers", "0-40"], "layers must lie in"),
    (["--method", "wanda", "--sparsity", "0.5", "--layers", "1-0"], "layers must look like"),
    (["--method", "wanda", "--pattern", "0.5"], "--pattern must look like 2:4"),
    (["--method", "attn", "--sparsity", "0.5", "--windows-per-step", "3"], "must divide"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib-len", "1"], "--calib-len must be"),
    (["--method", "wanda", "--sparsity", "1.2"], "sparsity must be in"),
    (["--method", "wanda", "--sparsity", "0.99"], "keeps none of the 16 entries of a q_proj row"),
    (["--method", "attn-progressive", "--sparsity", "0.5", "--targets", "all"],
     "attn-progressive prunes only q_proj and k_proj: targets 'all' need a baseline"),
    (["--method", "wanda", "--sparsity", "0.5", "--rest", "sparsegpt"],
     "with targets 'qk' there are none"),
    (["--method", "wanda", "--sparsity", "0.5", "--true-sequential"], "targets 'qk' are one group"),
    (["--method", "wanda", "--pattern", "8:16", "--targets", "all"],
     "down_proj: n_m=(8, 16) needs the last axis to be a multiple of 16, got 24"),
])
def test_prune_cli_errors(tiny_folder, tmp_path, capsys, argv, message):
  assert cli.main(["prune", "--model", str(tiny_folder), *SMALL_DATA, *argv,
                   "--out", str(tmp_path / "x"), "--quiet"]) == 2
  assert message in capsys.readouterr().err


def test_reproduce_is_resumable_row_by_row_and_plots(tiny_folder, tmp_path, monkeypatch):
  model = models.load(tiny_folder)
  grid = qk_pruning.ReproduceConfig(
      sparsities=("0.5", "2:4"), methods=("wanda", "magnitude"), layers=(0, 1),
      data=qk_pruning.DataConfig(calib_seqs=2, calib_len=16, heldout_seqs=1, eval_tokens=64))
  results = tmp_path / "results.json"
  rows = qk_pruning.reproduce(model, results, tmp_path / "work", grid, reporter=Reporter(
      quiet=True))
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

  monkeypatch.setattr(qk_pruning, "prune_row", fail)
  monkeypatch.setattr(qk_pruning, "dense_row", fail)
  again = qk_pruning.reproduce(model, results, tmp_path / "work", grid,
                               reporter=Reporter(quiet=True))
  assert again == rows
  # Rows computed by other code are computed again, not reused.
  monkeypatch.setattr(qk_pruning, "code_fingerprint", lambda modules: "other code")
  with pytest.raises(AssertionError, match="a finished row was recomputed"):
    qk_pruning.reproduce(model, results, tmp_path / "work", grid, reporter=Reporter(quiet=True))
  paths = qk_report.plot(rows, tmp_path / "figures")
  assert [p.name for p in paths] == ["perplexity.png", "attention_error_per_layer.png",
                                     "prune_time.png"]
  assert all(p.stat().st_size > 10_000 for p in paths)
  # Nor are rows of another model with the same windows (e.g. a pruned copy of it).
  monkeypatch.undo()
  other = Llama(model.config, model.weights() | {"norm": model.weights()["norm"] * 2},
                model.tokenizer)
  monkeypatch.setattr(qk_pruning, "dense_row", fail)
  with pytest.raises(AssertionError, match="a finished row was recomputed"):
    qk_pruning.reproduce(other, results, tmp_path / "work", grid, reporter=Reporter(quiet=True))


def test_reproduce_cli_on_another_model_keeps_its_rows_apart(tiny_folder, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(qk_pruning, "QUICK", dataclasses.replace(qk_pruning.QUICK,
                                                               data=SMALL_WINDOWS))
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


def test_model_fingerprint_covers_the_architecture_and_the_weights():
  model = Llama.random(TINY_LLAMA, jax.random.key(0))
  base = pipeline.model_fingerprint(model)
  assert pipeline.model_fingerprint(Llama(TINY_LLAMA, model.weights())) == base
  scaled = dataclasses.replace(TINY_LLAMA, rope_scaling=Llama3Scaling(8.0, 1.0, 4.0, 16))
  assert pipeline.model_fingerprint(Llama(scaled, model.weights())) != base
  norm = model.weights()["norm"]
  assert pipeline.model_fingerprint(Llama(TINY_LLAMA, model.weights() | {
      "norm": norm.at[0].add(1.0)})) != base
