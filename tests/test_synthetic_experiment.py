"""The section-6.1 experiment on a tiny grid: fields, checks, resume, cache keys, figures."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from attnprune_jax import cli
from attnprune_jax.reporting import Reporter
from attnprune_jax import numerics
from attnprune_jax.results import git_commit
from experiments import configs
from experiments import convergence, convergence_report
from experiments import synthetic_convergence as experiment

TINY = configs.SyntheticConfig(
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


def _copy(out, tmp_path):
  """A copy of the fixture's folder, for a test that changes stored files."""
  return shutil.copytree(out, tmp_path / "out")


def _count_calls(monkeypatch) -> list[str]:
  """Records each convergence run and sweep the experiment computes (instead of reusing)."""
  calls = []

  def counted(name):
    compute = getattr(experiment, name)

    def count_and_compute(*args, **kwargs):
      calls.append(name)
      return compute(*args, **kwargs)
    return count_and_compute

  for name in ("convergence_run", "sparsity_sweep"):
    monkeypatch.setattr(experiment, name, counted(name))
  return calls


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


def test_numbers_are_those_of_the_code_before_the_shared_core(tiny_results):
  # Values of commit 2984644, before the measurements moved to experiments/convergence.py (they
  # were bit-identical on the development machine; float64 on another CPU may differ in the
  # last digits).
  results, _ = tiny_results
  first, last = results["runs"][0], results["runs"][-1]
  assert (first["lam"], first["step_fraction"], first["causal"]) == (0.1, 0.5, True)
  assert (last["lam"], last["step_fraction"], last["causal"]) == (1.0, 1.9, False)
  want = {"lr": (0.007539995319308367, 0.018024571014886567),
          "smoothness_measured": (66.31303851337991, 117.86968741546845),
          "rate_measured": (0.998352610853673, 0.9561519949188156),
          "loss_limit": (0.2740490922435601, 0.44091612724020024)}
  for field, values in want.items():
    assert (first[field], last[field]) == pytest.approx(values, rel=1e-9), field
  assert (first["loss"][-1], last["loss"][-1]) == pytest.approx(
      (2.846938247780945, 2.7612399666716447), rel=1e-9)
  errors = {(r["method"], r["sparsity"]): r["attention_error"] for r in results["sparsity_sweep"]}
  assert [errors[m, 0.75] for m in convergence.MASK_RULES] == pytest.approx(
      [24.540954437409788, 6.290912948170593, 26.72700591911356, 6.290912948170593], rel=1e-9)


def test_sparsity_sweep_covers_every_method_with_exact_sparsity(tiny_results):
  results, _ = tiny_results
  rows = results["sparsity_sweep"]
  assert {(r["method"], r["sparsity"]) for r in rows} == {
      (m, s) for m in convergence.MASK_RULES for s in TINY.sparsities}
  assert "wanda-merged" in convergence.MASK_RULES and "wanda" not in convergence.MASK_RULES
  assert set(results["summary"]["mean_attention_error"]) == set(convergence.MASK_RULES)
  assert all(r["achieved_sparsity"] == r["sparsity"] and r["attention_error"] >= 0 for r in rows)


def test_rerun_resumes_without_recomputing(tiny_results, monkeypatch):
  results, out = tiny_results

  def fail(*args, **kwargs):
    raise AssertionError("a finished run was computed again")

  monkeypatch.setattr(experiment, "convergence_run", fail)
  monkeypatch.setattr(experiment, "sparsity_sweep", fail)
  again = experiment.run(TINY, out, Reporter(quiet=True))
  assert again.pop("provenance")["reused_runs"]["count"] == 8 + 1
  assert json.dumps(again, sort_keys=True) == json.dumps(
      {k: v for k, v in results.items() if k != "provenance"}, sort_keys=True)
  changed = dataclasses.replace(TINY, steps=60)
  with pytest.raises(AssertionError, match="computed again"):
    experiment.run(changed, out, Reporter(quiet=True))


def test_provenance_lists_the_commits_of_reused_runs(tiny_results, tmp_path, monkeypatch):
  out = _copy(tiny_results[1], tmp_path)
  older = out / "runs" / "n12_d8_lam1_step1.9_full_seed0.json"
  stored = json.loads(older.read_text())
  older.write_text(json.dumps(stored | {"git_commit": "0" * 40}))
  calls = _count_calls(monkeypatch)
  monkeypatch.setattr(configs, "SYNTHETIC_QUICK", TINY)
  monkeypatch.setattr(convergence_report, "plot_synthetic", lambda results, out: [])
  assert cli.main(["synthetic", "--quick", "--out", str(out), "--figures", str(tmp_path / "fig"),
                   "--quiet"]) == 0
  assert calls == []
  expected = {"count": 9, "commits": {git_commit(): 8, "0" * 40: 1}}
  for document in (out / "results.json", tmp_path / "fig" / "summary.json"):
    record = json.loads(document.read_text())["provenance"]
    assert record["reused_runs"] == expected
    assert record["numerics"] == numerics.SYNTHETIC


def test_figures_are_written(tiny_results, tmp_path):
  results, _ = tiny_results
  paths = convergence_report.plot_synthetic(results, tmp_path)
  assert [p.name for p in paths] == list(convergence_report.FIGURES)
  for path in paths:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_writes_results_json(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(configs, "SYNTHETIC_QUICK", TINY)
  assert cli.main(["synthetic", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
  document = json.loads((tmp_path / "results.json").read_text())
  assert document["kind"] == "synthetic" and document["schema_version"] == 1
  assert len(document["runs"]) == 8 and document["sparsity_sweep"]
  assert "git_commit" in document["provenance"]
  assert document["provenance"]["reused_runs"] == {"count": 0, "commits": {}}
  assert np.isfinite(document["summary"]["smoothness_measured_over_bound"]).all()
  assert capsys.readouterr().err == ""


@pytest.mark.usefixtures("x64")  # experiment.run computes its runs in float64; so does this one
def test_nothing_to_measure_is_stored_as_null_with_a_reason():
  config = configs.SyntheticConfig(batch=1, steps=8, segments=1, power_iters=5,
                                   history_points=8)
  run = experiment.convergence_run(config, n=6, d=4, lam=0.1, step_fraction=0.5,
                                              causal=True, seed=0)
  assert run["rate_measured"] is None and "no linear phase" in run["rate_measured_note"]
  json.dumps(run, allow_nan=False)  # standard JSON: no NaN or Infinity tokens
  summary = experiment.summarize([run], [])
  assert summary["rate_fitted_when_lr_within_bound"] == 0
  json.dumps(summary, allow_nan=False)
