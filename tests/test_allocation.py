"""Layer sparsity allocations: OWL's rule by hand and against a numpy reference on a tiny model,
exact counts per layer and overall, the settings' and the CLI's refusals."""

import fractions

import jax
import numpy as np
import pytest

from attnprune_jax import allocation
from attnprune_jax.errors import InputError
from attnprune_jax.models.llama import Llama
from attnprune_jax.patterns import kept_count
from attnprune_jax.pipeline import layer_sparsities, prune_model
from attnprune_jax.settings import TARGETS, Grid, PruneSettings
from conftest import TINY_LLAMA
from reference_numpy import llama_forward


def test_outlier_ratio_by_hand():
  # 99 ones and one 1000: mean 10.99, threshold 54.95, one score of 100 above it.
  assert allocation.outlier_ratio([np.ones(99), np.array([1000.0])]) == pytest.approx(0.01)
  assert allocation.outlier_ratio([np.ones((3, 4))]) == 0.0


def test_owl_densities_by_hand():
  # Ratios 0, 0.5, 1 onto [0, 0.16], then shifted to mean 0.5.
  np.testing.assert_allclose(allocation.owl_densities([0.0, 0.5, 1.0], 0.5), [0.42, 0.5, 0.58])
  np.testing.assert_allclose(allocation.owl_densities([0.2, 0.2], 0.7), [0.3, 0.3])


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7, 0.55])
def test_quantized_sparsities_keep_the_exact_total(sparsity):
  densities = allocation.owl_densities(np.random.default_rng(1).random(30), sparsity)
  out = allocation.quantized_sparsities(densities, sparsity, [576, 576, 1536])
  units = [fractions.Fraction(1) - fractions.Fraction(s).limit_denominator(192) for s in out]
  assert all(u.denominator in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 192) for u in units)
  assert sum(units) * 192 == round(30 * (1 - sparsity) * 192)  # 30·(1 − s)·192 is whole here
  # Every row of every width keeps a whole number at its layer's sparsity.
  for s, u in zip(out, units):
    for width in (576, 1536):
      assert kept_count(width, s) == u * width
  # Largest remainders: each layer within one unit of its wanted density.
  assert np.max(np.abs(np.array([float(u) for u in units]) - densities)) < 1 / 192


def test_quantized_sparsities_refuse_an_impossible_share():
  with pytest.raises(InputError, match="fewer than 1/4"):
    allocation.quantized_sparsities([0.01, 0.01], 0.99, [8, 12])


def _reference_ratios(model, tokens, targets):
  """OWL's outlier ratios from the numpy forward: Wanda scores over all calibration tokens."""
  inputs = []
  weights = {k: np.asarray(v, np.float64) for k, v in model.weights().items()}
  for window in tokens:
    per_window = []
    llama_forward(weights, window, model.config, linear_inputs=per_window)
    inputs.append(per_window)
  ratios = []
  for layer in range(model.config.num_layers):
    scores = []
    for target in targets:
      x = np.concatenate([window[layer][target] for window in inputs])
      scores.append(np.abs(weights[target][layer]) * np.linalg.norm(x, axis=0))
    ratios.append(allocation.outlier_ratio(scores))
  return ratios


@pytest.fixture(scope="module")
def spiky():
  """A tiny model whose layer 1 has a few very large weights (many outliers)."""
  model = Llama.random(TINY_LLAMA, jax.random.key(3), scale=0.5)
  weights = model.weights()
  rng = np.random.default_rng(0)
  for name in TARGETS["all"]:
    w = np.array(weights[name])
    w[1][rng.random(w[1].shape) < 0.05] *= 40
    weights[name] = w
  return Llama(TINY_LLAMA, weights), rng.integers(0, 64, (2, 12))


def test_owl_sparsities_follow_the_reference_ratios(spiky):
  model, tokens = spiky
  settings = PruneSettings("wanda", 0.5, targets="all", allocation="owl").for_model(TINY_LLAMA)
  got = layer_sparsities(model.weights(), TINY_LLAMA, settings, tokens)
  ratios = _reference_ratios(model, tokens, TARGETS["all"])
  assert ratios[1] > max(ratios[0], ratios[2])
  shapes = TINY_LLAMA.weight_shapes()
  want = allocation.quantized_sparsities(
      allocation.owl_densities(ratios, 0.5), 0.5, [shapes[t][-1] for t in TARGETS["all"]])
  assert tuple(got[i] for i in range(3)) == want
  assert got[1] == min(got.values())  # the layer with most outliers is pruned least


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_owl_prunes_exact_counts_per_layer_and_overall(spiky, method):
  model, tokens = spiky
  settings = PruneSettings(method, 0.5, targets="all", allocation="owl")
  result = prune_model(model, settings, tokens, tokens)
  shapes = TINY_LLAMA.weight_shapes()
  kept_total = entries = 0
  sparsities = [record["sparsity"] for record in result.layers]
  assert len(set(sparsities)) > 1 and np.mean(sparsities) == pytest.approx(0.5)
  for record in result.layers:
    for target in TARGETS["all"]:
      rows, cols = shapes[target][1:]
      assert record["kept"][target] == rows * kept_count(cols, record["sparsity"]), target
      kept_total += record["kept"][target]
      entries += rows * cols
  # gcd of the widths (16, 24) is 8; 3 layers · 0.5 · 8 units is whole: exactly half kept.
  assert kept_total * 2 == entries


def test_allocation_refusals():
  with pytest.raises(InputError, match="allocation must be one of"):
    PruneSettings("wanda", 0.5, allocation="owls")
  with pytest.raises(InputError, match="N:M hardware"):
    PruneSettings("wanda", 0.5, (2, 4), allocation="owl")
  with pytest.raises(InputError, match="per layer is an allocation"):
    PruneSettings("wanda", (0.4, 0.6), layers=(0, 1), allocation="owl")
  assert PruneSettings("wanda", 0.5, allocation="owl").name == "owl:wanda"
  assert "allocation" not in PruneSettings("wanda", 0.5).to_json()  # old rows keep their keys


def test_grid_runs_owl_at_unstructured_sparsities_only():
  grid = Grid(sparsities=("2:4", "0.6"), methods=("wanda", "owl:wanda"), targets="all")
  assert not grid.applies("owl:wanda", "2:4") and grid.applies("owl:wanda", "0.6")
  assert grid.settings("owl:wanda", "0.6").allocation == "owl"
  with pytest.raises(InputError, match="unstructured sparsities only"):
    Grid(sparsities=("2:4",), methods=("owl:wanda",), targets="all")
