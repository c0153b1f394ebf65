"""The convergence experiment on real weights: merged heads, recorded fields, the theory's checks,
resume, and the command on one real layer."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import attnprune_jax as ap
from attnprune_jax import cli, models, numerics
from attnprune_jax.errors import InputError
from attnprune_jax.attention import Llama3Scaling
from attnprune_jax.models.llama import Llama, LlamaConfig
from attnprune_jax.reporting import Reporter
from conftest import TINY_LLAMA
from experiments import configs, convergence, convergence_report
from experiments import real_convergence as experiment

CONFIG = TINY_LLAMA
TINY = dataclasses.replace(configs.REAL_QUICK, layers=(0, 2))
RUN_FIELDS = ("layer", "head", "kv_head", "lam", "lr", "loss", "grad_norm", "smoothness_measured",
              "smoothness_bound", "pl_mu", "pl_xi", "pl_xi_needed", "rate_measured",
              "rate_predicted", "lr_within_bound", "monotone")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  model = Llama.random(CONFIG, jax.random.key(0), scale=0.5)
  rng = np.random.default_rng(0)
  windows = {"calibration": rng.integers(0, 64, (2, 12)), "heldout": rng.integers(0, 64, (1, 12))}
  out = tmp_path_factory.mktemp("real_convergence")
  return model, windows, out, experiment.run(model, TINY, out, Reporter(quiet=True),
                                             windows=windows)


def _check_runs(results, config: configs.RealConfig, heads: int) -> None:
  """Every field recorded for every head and setting; the checks hold where they must."""
  runs = results["runs"]
  assert len(runs) == len(config.layers) * heads * len(config.lams) * len(config.step_fractions)
  assert {(r["layer"], r["head"]) for r in runs} == {
      (layer, h) for layer in config.layers for h in range(heads)}
  for run in runs:
    assert set(RUN_FIELDS) <= set(run)
    assert len(run["loss"]) == config.steps // run["history_stride"]
    assert run["lr"] == pytest.approx(run["step_fraction"] / run["smoothness_at_start"])
    assert run["smoothness_bound"] >= run["smoothness_measured"] > 0
    assert run["pl_holds"] and run["pl_mu"] == run["lam"] / 2
    if run["lr_within_bound"]:  # η ≤ 1/L_s (measured): descent, from the history itself
      assert run["history_stride"] == 1 and run["monotone"]
      assert np.all(np.diff(run["loss"]) <= 1e-6 * abs(run["loss"][0]))
      if run["rate_measured"] is not None:
        assert run["rate_measured"] <= run["rate_predicted"]
  summary = results["summary"]
  assert summary["runs"] == len(runs) and summary["heads"] == len(config.layers) * heads
  assert summary["runs_with_lr_within_bound"] > 0
  assert summary["monotone_when_lr_within_bound"] == summary["runs_with_lr_within_bound"]
  assert set(summary["per_layer"]) == {str(layer) for layer in config.layers}
  assert sum(s["runs"] for s in summary["per_layer"].values()) == len(runs)
  for record in results["merged_vs_model"]:
    assert 0 <= record["row_tv"] <= 1 and record["gap"] >= 0
  rows = results["sparsity_sweep"]
  assert len(rows) == len(config.layers) * heads * len(convergence.MASK_RULES) * len(
      config.sparsities)
  for row in rows:
    assert row["achieved_sparsity"] == pytest.approx(row["sparsity"], abs=1 / 16)
  for by_sparsity in summary["below_wanda_merged"].values():
    for heldout, calibration, problems in by_sparsity.values():
      assert problems == len(config.layers) * heads
      assert 0 <= heldout <= problems and 0 <= calibration <= problems
  checks = results["float64_check"]
  assert len(checks) == len(config.layers) * len(config.float64_heads)
  for check in checks:
    assert check["loss_max_relative_difference"] < 1e-4


def test_merged_heads_give_each_query_heads_scores_without_rope():
  rng = np.random.default_rng(1)
  heads, kv, hd, d = 6, 2, 3, 5
  q, k = rng.standard_normal((heads * hd, d)), rng.standard_normal((kv * hd, d))
  x = rng.standard_normal((7, d))
  w = np.asarray(experiment.merged_heads(q, k, num_heads=heads, num_kv_heads=kv, head_dim=hd))
  assert w.shape == (heads, d, d)
  for h in range(heads):
    g = h // (heads // kv)  # contiguous groups: heads 0-2 read KV head 0, heads 3-5 KV head 1
    queries, keys = x @ q[h * hd:(h + 1) * hd].T, x @ k[g * hd:(g + 1) * hd].T
    np.testing.assert_allclose(x @ w[h] @ x.T, queries @ keys.T / np.sqrt(hd), rtol=1e-5,
                               atol=1e-5)
    assert np.linalg.matrix_rank(w[h]) <= hd


def test_merged_vs_model_is_zero_for_the_merged_attention_itself():
  rng = np.random.default_rng(2)
  w, x = rng.standard_normal((2, 4, 4)), rng.standard_normal((3, 6, 4))
  merged = np.stack([ap.attention_matrix(x, head) for head in w], axis=1)  # (b, heads, n, n)
  same = experiment.merged_vs_model(w, x, merged)
  assert [r["gap"] for r in same] == pytest.approx([0, 0], abs=1e-10)
  swapped = experiment.merged_vs_model(w, x, merged[:, ::-1])
  expected = np.sum((merged[:, 0] - merged[:, 1])**2)
  assert swapped[0]["gap"] == pytest.approx(expected, rel=1e-5)
  assert swapped[0]["gap_relative"] == pytest.approx(expected / np.sum(merged[:, 1]**2), rel=1e-5)
  tv = 0.5 * np.abs(merged[:, 0] - merged[:, 1]).sum(-1).mean()
  assert swapped[1]["row_tv"] == pytest.approx(tv, rel=1e-5)


def test_layer_inputs_are_the_models_own(tiny):
  model, windows, _, _ = tiny
  _, captured = model(windows["calibration"], return_attention_inputs=True,
                      return_attention=True)
  inputs = experiment.attention_inputs(model, windows)
  for layer in (1, 2):
    problem = experiment.layer_inputs(model, inputs, layer)
    np.testing.assert_array_equal(problem["x"], captured["attention_inputs"][layer])
    np.testing.assert_allclose(problem["attention"], captured["attention"][layer], atol=1e-6)
  held = model(windows["heldout"], return_attention_inputs=True)[1]["attention_inputs"]
  np.testing.assert_array_equal(experiment.layer_inputs(model, inputs, 2)["heldout"], held[2])


def test_wins_over_wanda_merged_are_counted_per_head_and_sparsity():
  def row(layer, head, method, held, calib, sparsity=0.5):
    return {"layer": layer, "head": head, "method": method, "sparsity": sparsity,
            "attention_error": held, "calibration_error": calib}
  sweep = [row(0, 0, "wanda-merged", 2.0, 2.0), row(0, 0, "attn", 1.0, 3.0),
           row(0, 1, "wanda-merged", 2.0, 2.0), row(0, 1, "attn", 2.0, 1.0),
           row(1, 0, "wanda-merged", 2.0, 2.0), row(1, 0, "attn", 1.5, 1.5),
           row(1, 0, "wanda-merged", 1.0, 1.0, 0.9), row(1, 0, "attn", 3.0, 3.0, 0.9)]
  counts = convergence.summarize([], sweep)["below_wanda_merged"]
  assert counts == {"attn": {"0.5": [2, 2, 3], "0.9": [0, 0, 1]}}


def test_layers_and_heads_outside_the_model_are_refused(tiny, tmp_path):
  model, windows, _, _ = tiny
  for config, message in ((dataclasses.replace(TINY, layers=(3,)), r"layers must be .* \[0, 3\)"),
                          (dataclasses.replace(TINY, float64_heads=(4,)), "float64_heads")):
    with pytest.raises(InputError, match=message):
      experiment.run(model, config, tmp_path, Reporter(quiet=True), windows=windows)


def test_tiny_model_records_every_field_and_the_theory_holds(tiny):
  _, _, _, results = tiny
  _check_runs(results, TINY, CONFIG.num_heads)
  assert {r["kv_head"] for r in results["runs"] if r["head"] in (0, 1)} == {0}
  paths = convergence_report.plot_real(results, tiny[2] / "figures")
  assert [p.name for p in paths] == list(convergence_report.FIGURES)
  assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_rerun_skips_finished_layers(tiny, monkeypatch):
  model, windows, out, results = tiny
  layers = []
  compute = experiment.run_layer

  def counted(config, model, layer, inputs):
    layers.append(layer)
    return compute(config, model, layer, inputs)

  monkeypatch.setattr(experiment, "run_layer", counted)
  again = experiment.run(model, dataclasses.replace(TINY, layers=(0, 1, 2)), out,
                         Reporter(quiet=True), windows=windows)
  assert layers == [1]
  assert again["provenance"]["reused_layers"]["count"] == 2
  assert [r for r in again["runs"] if r["layer"] != 1] == results["runs"]
  other = {"calibration": windows["calibration"][:, ::-1], "heldout": windows["heldout"]}
  experiment.run(model, dataclasses.replace(TINY, layers=(0,)), out, Reporter(quiet=True),
                 windows=other)
  assert layers == [1, 0]  # other windows: computed again


@pytest.mark.slow  # the default tier: the tiny model, and the golden sample of the real figures
def test_command_on_one_real_layer(smollm2, tmp_path, monkeypatch):
  monkeypatch.setattr(models, "load", lambda name: smollm2)
  out, figures = tmp_path / "out", tmp_path / "figures"
  assert cli.main(["convergence", "--quick", "--layers", "3", "--out", str(out), "--figures",
                   str(figures), "--quiet"]) == 0
  document = json.loads((out / "results.json").read_text())
  assert document["kind"] == "convergence" and document["config"]["layers"] == [3]
  config = dataclasses.replace(configs.REAL_QUICK, layers=(3,))
  _check_runs(document, config, smollm2.config.num_heads)
  assert document["model"]["hidden_size"] == 576
  assert document["provenance"]["numerics"] == numerics.REAL_CONVERGENCE
  assert document["provenance"]["git_commit"]
  summary = json.loads((figures / "summary.json").read_text())
  assert summary["summary"] == document["summary"]
  assert sorted(p.name for p in figures.glob("*.png")) == sorted(convergence_report.FIGURES)


@pytest.mark.parametrize("options, message", [
    (["--layers", "30"], "--layers must lie in 0-29"),
    (["--windows", "100000"], "--windows and --ctx ask for"),
])
def test_command_refuses_options_beyond_the_model(smollm2, tmp_path, monkeypatch, capsys,
                                                  options, message):
  monkeypatch.setattr(models, "load", lambda name: smollm2)
  assert cli.main(["convergence", "--quick", "--out", str(tmp_path / "out")] + options) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("options, message", [
    (["--steps", "5"], "--steps must be at least 10"),
    (["--windows", "0"], "--windows must be a positive integer"),
    (["--ctx", "1"], "--ctx must be an integer >= 2"),
    (["--layers", "3-1"], "--layers must look like 0-29 or 0,5,10-12 or all, got '3-1'"),
    (["--layers", "abc"], "--layers must look like"),
])
def test_command_refuses_bad_options_before_loading(tmp_path, monkeypatch, capsys, options,
                                                    message):
  def load(name):
    raise AssertionError("the model was loaded before the options were checked")

  monkeypatch.setattr(models, "load", load)
  assert cli.main(["convergence", "--out", str(tmp_path / "out")] + options) == 2
  assert message in capsys.readouterr().err


def test_command_on_a_checkpoint_folder(smollm2, tmp_path, monkeypatch):
  """`--model FOLDER`: the experiment gets the model of a Hugging Face checkpoint (llama3 RoPE
  scaling, the real tokenizer for the text windows) and its options are checked against it.
  (The experiment itself on a model is tested above; here only the folder's way in.)"""
  config = LlamaConfig(vocab_size=smollm2.tokenizer.vocab_size, hidden_size=16,
                       intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=4, rope_base=1e4, rms_eps=1e-5,
                       rope_scaling=Llama3Scaling(8.0, 1.0, 4.0, 16), max_positions=64)
  rng = np.random.default_rng(0)
  weights = {name: rng.normal(size=shape).astype(np.float32)
             for name, shape in config.weight_shapes().items()}
  models.save(Llama(config, weights, smollm2.tokenizer), tmp_path / "model")
  received = []

  def run(model, real_config, out, reporter):
    received.append((model, real_config))
    raise KeyboardInterrupt  # stop here: exit status 130

  monkeypatch.setattr(experiment, "run", run)
  argv = ["convergence", "--quick", "--model", str(tmp_path / "model"), "--out",
          str(tmp_path / "out"), "--figures", str(tmp_path / "figures"), "--quiet"]
  assert cli.main(argv + ["--layers", "1"]) == 130
  (model, real_config), = received
  assert model.config == config and real_config.layers == (1,)
  np.testing.assert_array_equal(model.weights()["q_proj"], weights["q_proj"])
  assert cli.main(argv + ["--layers", "2"]) == 2
  assert cli.main(argv + ["--ctx", "65"]) == 2 and len(received) == 1
