"""Golden samples of the theory figures and the q/k and block sweeps (see test_golden_samples.py).

The default tier recomputes one synthetic run behind figures/synthetic, head 0 of the first layer
behind figures/real/theory and Wanda's block error on the block sweep's first layer; the `slow`
tier the baselines' errors on the q/k sweeps' first layer, SparseGPT's block error and a solved
row of each sweep (the same pruners' code is sampled in the default tier by
test_golden_samples.py's rows). In a file of their own so that the two test workers share the
golden samples' time.
"""

import functools

import jax
import pytest

from conftest import RTOL32, RTOL64, chained_rtol, optimized_compilation, stored

from attnprune_jax import numerics
from attnprune_jax.models.llama import layer_weights
from attnprune_jax.solver_config import BlockSolverConfig, MaskSolverConfig
from experiments import (block_sweep, convergence, qk_sweep, real_convergence,
                         synthetic_convergence)
from experiments.configs import RealConfig, SyntheticConfig


def test_synthetic_figures_sample():
  document = stored("figures/synthetic/summary.json")
  assert document["provenance"]["numerics"] == numerics.SYNTHETIC
  golden = document["golden"]
  config = SyntheticConfig(**document["config"])
  with jax.enable_x64(True):
    run = synthetic_convergence.convergence_run(
        config, **{k: golden[k] for k in ("n", "d", "lam", "step_fraction", "causal", "seed")})
  assert synthetic_convergence.golden_sample([run]) == pytest.approx(golden, rel=RTOL64)


@pytest.mark.usefixtures("optimized_xla")
def test_real_weight_theory_figures_sample(smollm2):
  document = stored("figures/real/theory/summary.json")
  assert document["provenance"]["numerics"] == numerics.REAL_CONVERGENCE
  golden = document["golden"]
  config = RealConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in document["config"].items()})
  inputs = real_convergence.attention_inputs(smollm2, real_convergence.token_windows(
      smollm2, config))
  layer = golden["layer"]
  problem = real_convergence.layer_inputs(smollm2, inputs, layer)
  c = smollm2.config
  w = real_convergence.merged_heads(smollm2.weights()["q_proj"][layer],
                                    smollm2.weights()["k_proj"][layer], num_heads=c.num_heads,
                                    num_kv_heads=c.num_kv_heads, head_dim=c.head_dim)
  # The sampled head alone: heads are solved independently, from the same power-iteration key.
  head = golden["head"]
  [run] = convergence.convergence_runs(
      w[head:head + 1], problem["x"], lam=golden["lam"], step_fraction=golden["step_fraction"],
      causal=True, steps=config.steps, segments=config.segments, power_iters=config.power_iters,
      history_points=config.history_points, key=jax.random.key(layer))
  record = {"layer": layer, "head": head, **run}
  assert real_convergence.golden_sample([record]) == pytest.approx(golden, rel=RTOL32)


SWEEPS = ("results/qk_sweep_progressive.json", "results/qk_sweep_attn.json")


@pytest.fixture(scope="module")
def sweep_problems(smollm2):
  """The sweeps' first layer (5) on its dense inputs, computed as the sweep computed them."""
  with optimized_compilation():
    return qk_sweep.layer_problems(smollm2, (5,))


@pytest.fixture(scope="module")
def sweep_baselines(smollm2, sweep_problems):
  """The baselines' errors on the sweeps' first layer by sparsity, computed once per module."""
  return functools.cache(
      lambda sparsity: qk_sweep.baseline_errors(smollm2, sweep_problems[5], sparsity))


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS)
def test_sweep_baselines(sweep_baselines, path):
  document = stored(path)
  assert document["numerics"] == numerics.PRUNING
  row = next(r for r in document["rows"] if r["layer"] == 5)
  errors = sweep_baselines(row["sparsity"])
  assert errors["wanda"] == pytest.approx(row["wanda_error"], rel=RTOL32)
  assert errors["sparsegpt"] == pytest.approx(row["sparsegpt_error"], rel=RTOL32)


@pytest.mark.slow
@pytest.mark.usefixtures("optimized_xla")
@pytest.mark.parametrize("path", SWEEPS)
def test_sweep_solved_row(smollm2, sweep_problems, path):
  document = stored(path)
  row = next(r for r in document["rows"] if r["layer"] == 5 and r["variant"] == "default")
  error = qk_sweep.solved_error(smollm2, sweep_problems[5], row["method"], row["sparsity"],
                                MaskSolverConfig(**row["solver"]))
  assert error == pytest.approx(row["heldout_error"], rel=chained_rtol(document["provenance"]))


BLOCK_SWEEP = "results/whole_model_sweep.json"


@pytest.fixture(scope="module")
def block_sweep_layer(smollm2):
  """The block sweep's first layer (5) and its dense inputs, computed as the sweep computed them."""
  with optimized_compilation():
    return layer_weights(smollm2.weights(), 5), block_sweep.dense_inputs(smollm2, 5)


def block_sweep_row(method: str, variant: str) -> dict:
  document = stored(BLOCK_SWEEP)
  assert document["numerics"] == numerics.PRUNING
  return next(r for r in document["rows"]
              if (r["layer"], r["method"], r["variant"]) == (5, method, variant))


@pytest.mark.parametrize("method", ["wanda", pytest.param("sparsegpt", marks=pytest.mark.slow)])
def test_block_sweep_baselines(smollm2, block_sweep_layer, method):
  row = block_sweep_row(method, "")
  error = block_sweep.row_error(smollm2.config, *block_sweep_layer, method, row["sparsity"])
  assert error == pytest.approx(row["block_error"], rel=RTOL32)


@pytest.mark.slow
@pytest.mark.usefixtures("optimized_xla")
def test_block_sweep_solved_row(smollm2, block_sweep_layer):
  row = block_sweep_row("attn-block-reweight", "default")
  error = block_sweep.row_error(smollm2.config, *block_sweep_layer, row["method"],
                                row["sparsity"], BlockSolverConfig(**row["settings"]))
  assert error == pytest.approx(row["block_error"],
                                rel=chained_rtol(stored(BLOCK_SWEEP)["provenance"]))
