"""The method registry: every method registered once, the choices and colours derived from it,
and a new method added with one file and one registration line, then run through `prune` and
`reproduce --report-only` with no other edit."""

import dataclasses
import json

import numpy as np
import pytest

from attnprune_jax import cli, methods, models, runs, settings
from attnprune_jax.errors import InputError
from conftest import SMALL_DATA, SMALL_WINDOWS
from reference_numpy import binarize_rows


@pytest.fixture
def registry(monkeypatch):
  """The registry, restored after the test."""
  monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))
  return methods.REGISTRY


def test_every_method_is_registered_once_with_what_it_needs():
  assert methods.names("linear") == ("magnitude", "wanda", "sparsegpt")
  assert methods.names("qk") == ("attn", "attn-progressive", "attn-reweight")
  assert methods.names("block") == ("attn-block", "attn-block-reweight")
  assert {m.name for m in methods.REGISTRY.values() if m.changes_values} == {
      "sparsegpt", "attn-reweight", "attn-block-reweight"}
  assert all((m.solver is not None) == (m.kind != "linear") for m in methods.REGISTRY.values())
  assert methods.get("attn").solver.lam == 1e-2 and methods.get("attn-progressive").solver.lam == 3e-3
  for method in methods.REGISTRY.values():
    assert callable(method.prune)  # every implementation imports
  parser = cli.build_parser()
  prune = parser._subparsers._group_actions[0].choices["prune"]
  choices = {a.dest: a.choices for a in prune._actions if a.choices}
  assert tuple(choices["method"]) == methods.names()
  assert tuple(choices["rest"]) == methods.names("linear")


def test_registration_is_checked(registry):
  with pytest.raises(InputError, match="registered already"):
    methods.register(methods.Method("wanda", "linear", "example_method:prune"))
  with pytest.raises(InputError, match="letters, digits and '-'"):
    methods.Method("a+b", "linear", "example_method:prune")
  with pytest.raises(InputError, match="kind must be one of"):
    methods.Method("x", "layer", "example_method:prune")
  with pytest.raises(InputError, match="a block method needs BlockSolverConfig settings"):
    methods.Method("x", "block", "example_method:prune", solver=methods.get("attn").solver)
  with pytest.raises(InputError, match="a linear method has no solver settings"):
    methods.Method("x", "linear", "example_method:prune", solver=methods.get("attn").solver)
  with pytest.raises(InputError, match=r"rest must be one of \('magnitude', 'wanda', 'sparsegpt'\)"):
    methods.get("attn", "linear", argument="rest")


def test_colours_come_from_the_registry_and_new_names_get_one(registry):
  assert methods.color("wanda") == "tab:blue"
  assert methods.color("attn-progressive+wanda") == methods.color("attn-progressive")
  first = methods.register(methods.Method("first-new", "linear", "example_method:prune"))
  second = methods.register(methods.Method("second-new", "linear", "example_method:prune"))
  assert methods.color(first.name) != methods.color(second.name)
  assert methods.color(first.name) not in {m.color for m in registry.values()}


def test_a_new_method_is_one_file_and_one_registration(registry, tiny_folder, tmp_path,
                                                       monkeypatch):
  methods.register(methods.Method("energy", "linear", "example_method:prune"))  # the one line

  out = tmp_path / "run"
  assert cli.main(["prune", "--model", str(tiny_folder), "--method", "energy", "--sparsity",
                   "0.75", "--layers", "0", *SMALL_DATA, "--out", str(out), "--quiet"]) == 0
  row = json.loads((out / "results.json").read_text())
  assert row["method"] == "energy" and row["removed"]["per_target"]["q_proj"] == 0.75
  # The mask is the method's own: the top |W_ij|·‖X_j‖² of each row, from the layer's inputs.
  model = models.load(tiny_folder)
  calibration = runs.token_windows(model, SMALL_WINDOWS)["calibration"]
  _, captured = model(calibration, return_attention_inputs=True)
  x = np.asarray(captured["attention_inputs"][0], np.float64).reshape(-1, 16)
  q = np.asarray(model.weights()["q_proj"][0], np.float64)
  expected = binarize_rows(np.abs(q) * (x**2).sum(0)[None, :], 4)  # 16 inputs, 75 % pruned
  with np.load(out / "layer-000.npz") as stored:
    np.testing.assert_array_equal(stored["q_proj"] != 0, expected)

  monkeypatch.chdir(tmp_path)
  real = settings.reproduce_grid
  monkeypatch.setattr(settings, "reproduce_grid", lambda *a: dataclasses.replace(
      real(*a), data=SMALL_WINDOWS))
  argv = ["reproduce", "--model", str(tiny_folder), "--quick", "--methods", "energy",
          "--sparsities", "0.7", "--results", "rows.json", "--work", "work", "--figures", "figures",
          "--quiet"]
  assert cli.main(argv) == 0
  (tmp_path / "rows.md").unlink()
  assert cli.main(argv + ["--report-only"]) == 0
  assert "| `energy` |" in (tmp_path / "rows.md").read_text()
  assert {p.name for p in (tmp_path / "figures").glob("*.png")} >= {
      "perplexity.png", "attention_error_per_layer.png", "prune_time.png"}
