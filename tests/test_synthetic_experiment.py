"""The section-6.1 experiment on a tiny grid: fields, checks, resume, figures."""

import dataclasses
import json

import numpy as np
import pytest

from attnprune_jax import cli
from attnprune_jax.reporting import Reporter
from experiments import synthetic_convergence as experiment

TINY = experiment.SyntheticConfig(
    lams=(0.1, 1.0), step_fractions=(0.5, 1.9), sizes=((12, 8),), causal=(True, False),
    seeds=(0,), steps=80, segments=2, power_iters=30, history_points=40, sweep_size=(24, 16),
    sweep_batch=2, sweep_seeds=(0,), sparsities=(0.5, 0.75), attn_steps=20,
    progressive_rounds=3, progressive_steps=5)

RUN_FIELDS = ("n", "d", "lam", "lr", "causal", "seed", "loss", "grad_norm",
              "smoothness_measured", "smoothness_bound", "pl_mu", "pl_xi", "rate_measured",
              "rate_predicted")


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  return experiment.run(TINY, out, Reporter(quiet=True)), out


def test_runs_have_the_documented_fields_and_the_theory_holds(tiny_results):
  results, _ = tiny_results
  assert len(results["runs"]) == 8
  for run in results["runs"]:
    assert set(RUN_FIELDS) <= set(run)
    assert len(run["loss"]) == len(run["grad_norm"]) == 40
    assert run["smoothness_bound"] >= run["smoothness_measured"] > 0
    assert run["pl_holds"] and run["pl_xi_needed"] <= run["pl_xi"]
    assert run["pl_mu"] == run["lam"] / 2
    assert run["rate_predicted"] == pytest.approx(1 - run["lr"] * run["lam"] / 2)
    if run["lr_within_bound"]:
      assert run["monotone"]
      assert run["rate_measured"] <= run["rate_predicted"]
  summary = results["summary"]
  assert summary["smoothness_bound_holds"] == summary["pl_holds"] == 8
  assert summary["monotone_when_lr_within_bound"] == summary["runs_with_lr_within_bound"] > 0
  assert (summary["rate_measured_le_predicted_when_lr_within_bound"]
          == summary["rate_fitted_when_lr_within_bound"])


def test_sparsity_sweep_covers_every_method_with_exact_sparsity(tiny_results):
  results, _ = tiny_results
  rows = results["sparsity_sweep"]
  assert {(r["method"], r["sparsity"]) for r in rows} == {
      (m, s) for m in experiment.METHODS for s in TINY.sparsities}
  assert all(r["achieved_sparsity"] == r["sparsity"] and r["attention_error"] >= 0 for r in rows)


def test_rerun_resumes_without_recomputing(tiny_results, monkeypatch):
  results, out = tiny_results

  def fail(*args, **kwargs):
    raise AssertionError("a finished run was computed again")

  monkeypatch.setattr(experiment, "convergence_run", fail)
  monkeypatch.setattr(experiment, "sparsity_sweep", fail)
  again = experiment.run(TINY, out, Reporter(quiet=True))
  assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)
  changed = dataclasses.replace(TINY, steps=60)
  with pytest.raises(AssertionError, match="computed again"):
    experiment.run(changed, out, Reporter(quiet=True))


def test_figures_are_written(tiny_results, tmp_path):
  results, _ = tiny_results
  paths = experiment.plot(results, tmp_path)
  assert [p.name for p in paths] == list(experiment.FIGURES)
  for path in paths:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_writes_results_json(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(experiment, "QUICK", TINY)
  assert cli.main(["synthetic", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
  document = json.loads((tmp_path / "results.json").read_text())
  assert document["kind"] == "synthetic" and document["schema_version"] == 1
  assert len(document["runs"]) == 8 and document["sparsity_sweep"]
  assert "git_commit" in document["provenance"]
  assert np.isfinite(document["summary"]["smoothness_measured_over_bound"]).all()
  assert capsys.readouterr().err == ""
