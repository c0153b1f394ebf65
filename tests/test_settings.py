"""Settings check themselves on construction, without JAX: prune settings (per-layer sparsity,
targets, the method's solver), token windows, the reproduce grids, sparsity patterns."""

import subprocess
import sys

import pytest

from attnprune_jax import methods
from attnprune_jax.errors import InputError
from attnprune_jax.patterns import parse_pattern, pattern_name
from attnprune_jax.settings import (QK_SPARSITIES, WHOLE_MODEL_SPARSITIES, DataConfig, Grid,
                                    PruneSettings, quick_layers, reproduce_grid)
from attnprune_jax.solver_config import MaskSolverConfig
from conftest import TINY_LLAMA


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="random"), "method must be one of"),
    (dict(method="wanda", layers=(2, 1)), "layers must be distinct"),
    (dict(method="wanda", layers=()), "layers must be distinct"),
    (dict(method="wanda", sparsity=1.5), r"sparsity must be in \[0, 1\)"),
    (dict(method="wanda", sparsity=(0.5, 0.7)), r"one number or one per layer \(1\), got 2"),
    (dict(method="wanda", sparsity=(0.5,), n_m=(2, 4)), "a sparsity per layer is unstructured"),
    (dict(method="wanda", n_m=(2, 8)), "contradicts n_m="),
    (dict(method="wanda", solver=MaskSolverConfig()), "solver settings apply to the methods"),
    (dict(method="attn-progressive", targets="attention"), "need a linear method for the other"),
    (dict(method="wanda", rest="wanda"), "with targets 'qk' there are none"),
    (dict(method="wanda", targets="all", rest="attn"), "rest must be one of"),
    (dict(method="wanda", targets="mlp"), "targets must be one of"),
    (dict(method="wanda", true_sequential=True), "targets 'qk' are one group"),
    (dict(method="wanda", targets="all", true_sequential=1), "true_sequential must be"),
])
def test_prune_settings_are_checked(kwargs, message):
  with pytest.raises(InputError, match=message):
    PruneSettings(**{"sparsity": 0.5, "layers": (0,)} | kwargs)


def test_the_methods_solver_settings_are_recorded_and_layers_resolved_per_model():
  assert PruneSettings("attn-progressive", 0.5).to_json()["solver"]["lam"] == 3e-3
  assert PruneSettings("wanda", 0.5).to_json()["solver"] is None
  resolved = PruneSettings("wanda", 0.5).for_model(TINY_LLAMA)
  assert resolved.layers == (0, 1, 2) and resolved.to_json()["layers"] == [0, 1, 2]
  per_layer = PruneSettings("wanda", (0.25, 0.75), None, (0, 2))
  assert per_layer.sparsity_of(2) == 0.75 and per_layer.mean_sparsity == 0.5
  assert per_layer.to_json()["sparsity"] == [0.25, 0.75]
  with pytest.raises(InputError, match=r"layers must lie in 0-2"):
    PruneSettings("wanda", 0.5, None, (3,)).for_model(TINY_LLAMA)
  with pytest.raises(InputError, match="keeps none of the 16 entries of a q_proj row"):
    PruneSettings("wanda", (0.5, 0.99), None, (0, 1)).for_model(TINY_LLAMA)
  with pytest.raises(InputError, match="down_proj: n_m=.* multiple of 16, got 24"):
    PruneSettings("wanda", 0.5, (8, 16), targets="all").for_model(TINY_LLAMA)
  with pytest.raises(InputError, match=r"windows_per_step \(2\) must divide"):
    PruneSettings("attn", 0.5).check_windows(3)


@pytest.mark.parametrize("field,value,message", [
    ("calib_seqs", 0, "calib_seqs must be a positive integer"),
    ("calib_len", 1, "calib_len must be at least 2"),
    ("eval_tokens", 100, "eval_tokens must be at least calib_len=512"),
    ("batch", 1.5, "batch must be an integer"),
])
def test_data_settings_are_checked(field, value, message):
  with pytest.raises(InputError, match=message):
    DataConfig(**{field: value})


def test_reproduce_grids():
  default = reproduce_grid()
  assert default.sparsities == ("0.7", "2:4", "0.8", "0.5") and len(default.methods) == 6
  assert reproduce_grid("qk", "full").sparsities[-3:] == ("0.3", "0.6", "0.9")
  quick = reproduce_grid("qk", "quick")
  assert quick.quick and quick.data.eval_tokens == 2048 and quick.sparsities == ("0.7",)
  whole = reproduce_grid("all")
  assert whole.stem == "whole_model" and "attn-reweight+sparsegpt" in whole.methods
  settings = whole.settings("attn-progressive+wanda", "2:4")
  assert (settings.method, settings.rest, settings.n_m) == ("attn-progressive", "wanda", (2, 4))
  with pytest.raises(InputError, match="attn with targets all: .* need a linear method"):
    reproduce_grid("all", methods=("attn",))
  with pytest.raises(InputError, match="pattern must look like 2:4"):
    Grid(sparsities=("2:x",))
  assert quick_layers(30) == (5, 15, 25) and quick_layers(3) == (0, 2)


@pytest.mark.parametrize("text,expected", [
    ("0.7", (0.7, None)), ("2:4", (0.5, (2, 4))), ("0:4", (0.0, (0, 4)))])
def test_patterns_parse(text, expected):
  assert parse_pattern(text) == expected
  assert pattern_name(expected[1]) == ("unstructured" if ":" not in text else text)


@pytest.mark.parametrize("text", ["4:2", "2:0", "2:4:8", "a:4", "-1:4", "²:4", "1.5", "x"])
def test_bad_patterns_are_refused(text):
  with pytest.raises(InputError):
    parse_pattern(text)


def test_settings_and_the_command_line_import_no_jax():
  code = ("import sys; from attnprune_jax import cli, settings, methods, run_folder; "
          "from experiments import configs; cli.build_parser(); "
          "settings.reproduce_grid('all'); settings.PruneSettings('attn', 0.5); "
          "print(sorted(m for m in ('jax', 'numpy', 'optax', 'flax') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == "['numpy']"
  assert methods.names()  # and the registry is what the command's choices come from


@pytest.mark.parametrize("targets", ["qk", "all"])
def test_reproduce_grid_takes_a_subset_of_methods_and_sparsities(targets):
  grid = reproduce_grid(targets, "default", ("wanda",), ("2:4", "0.5"))
  assert grid.methods == ("wanda",) and grid.sparsities == ("2:4", "0.5")
  assert reproduce_grid(targets).sparsities == (QK_SPARSITIES if targets == "qk"
                                                else WHOLE_MODEL_SPARSITIES)
