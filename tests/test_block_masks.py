"""Whole-block attention-aware methods: the halves' losses and gradients against a numpy
reference, exact counts and dense values, the teacher and local targets, the pipeline."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnprune_jax import block_masks, methods
from attnprune_jax.errors import InputError
from attnprune_jax.models.llama import Llama, attention_input, layer_weights
from attnprune_jax.pipeline import prune_model
from attnprune_jax.settings import TARGETS, PruneSettings
from attnprune_jax.solver_config import BlockSolverConfig
from conftest import TINY_GEMMA, TINY_LLAMA
from reference_numpy import attention_half, mlp_half

SMALL = BlockSolverConfig(rounds=2, steps_per_round=3, reweight_steps=2, windows_per_step=1)
ALL = TARGETS["all"]


def _problem(rng, dtype, config=TINY_LLAMA, index=0):
  model = Llama.random(config, jax.random.key(1), scale=0.5)
  layer = {k: jnp.asarray(v, dtype) for k, v in layer_weights(model.weights(), index).items()}
  hidden = jnp.asarray(rng.normal(size=(2, 7, config.hidden_size)), dtype)
  masks = {name: jnp.asarray(rng.uniform(0.2, 1.5, layer[name].shape), dtype)
           for name in block_masks.ATTENTION + block_masks.MLP}
  target = jnp.asarray(rng.normal(size=hidden.shape), dtype)
  return layer, hidden, masks, target


def _numpy_losses(layer, x, masks, target, alpha, lam, config=TINY_LLAMA, index=0):
  """Both halves' losses from the float64 numpy forward, window by window."""
  w = {k: np.asarray(v, np.float64) for k, v in layer.items()}
  pruned = w | {k: np.asarray(m, np.float64) * w[k] for k, m in masks.items()}
  x, target = np.asarray(x, np.float64), np.asarray(target, np.float64)
  out_err = out_ref = attn_err = attn_ref = mlp_err = 0.0
  for xw, yw in zip(x, target):
    out, probs, _ = attention_half(xw, pruned, config, index)
    _, dense_probs, _ = attention_half(xw, w, config, index)
    out_err += np.sum((out - yw)**2)
    out_ref += np.sum(yw**2)
    attn_err += np.sum((probs - dense_probs)**2)
    attn_ref += np.sum(dense_probs**2)
    mlp_err += np.sum((mlp_half(xw, pruned, config)[0] - yw)**2)
  l2 = lambda names: lam / 2 * sum(np.sum(np.asarray(masks[n], np.float64)**2) for n in names)
  return (out_err / out_ref + alpha * attn_err / attn_ref + l2(block_masks.ATTENTION),
          mlp_err / out_ref + l2(block_masks.MLP))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("config,index", [(TINY_LLAMA, 0), (TINY_GEMMA, 0), (TINY_GEMMA, 2)],
                         ids=["llama", "gemma-sliding", "gemma-full"])
def test_half_losses_match_numpy(config, index):
  layer, hidden, masks, target = _problem(np.random.default_rng(0), jnp.float64, config, index)
  x = attention_input(hidden, layer, config)
  attention_masks = {n: masks[n] for n in block_masks.ATTENTION}
  mlp_masks = {n: masks[n] for n in block_masks.MLP}
  want_attention, want_mlp = _numpy_losses(layer, x, masks, target, 0.7, 0.01, config, index)
  got = block_masks.attention_half_loss(attention_masks, layer, x, target, config=config,
                                        attention_weight=0.7, lam=0.01, index=index)
  np.testing.assert_allclose(got, want_attention, rtol=1e-10)
  got = block_masks.mlp_half_loss(mlp_masks, layer, x, target, config=config, lam=0.01)
  np.testing.assert_allclose(got, want_mlp, rtol=1e-10)
  # Without q/k masks the attention term is absent (the attention matrix is the dense one).
  vo = {n: masks[n] for n in ("v_proj", "o_proj")}
  got = block_masks.attention_half_loss(vo, layer, x, target, config=config,
                                        attention_weight=0.7, lam=0.0, index=index)
  dense_qk = {n: jnp.ones_like(layer[n]) for n in ("q_proj", "k_proj")} | vo
  np.testing.assert_allclose(
      got, _numpy_losses(layer, x, masks | dense_qk, target, 0.0, 0.0, config, index)[0],
      rtol=1e-10)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", ["q_proj", "o_proj", "up_proj", "down_proj"])
def test_half_gradients_match_finite_differences(name):
  rng = np.random.default_rng(1)
  layer, hidden, masks, target = _problem(rng, jnp.float64)
  x = attention_input(hidden, layer, TINY_LLAMA)
  half = block_masks.ATTENTION if name in block_masks.ATTENTION else block_masks.MLP
  masks = {n: masks[n] for n in half}
  if half == block_masks.ATTENTION:
    loss = lambda m: block_masks.attention_half_loss(m, layer, x, target, config=TINY_LLAMA,
                                                     attention_weight=0.7, lam=0.01)
  else:
    loss = lambda m: block_masks.mlp_half_loss(m, layer, x, target, config=TINY_LLAMA,
                                               lam=0.01)
  grad = jax.grad(loss)(masks)[name]
  eps = 1e-6
  for _ in range(4):
    i, j = rng.integers(layer[name].shape[0]), rng.integers(layer[name].shape[1])
    up = masks | {name: masks[name].at[i, j].add(eps)}
    down = masks | {name: masks[name].at[i, j].add(-eps)}
    np.testing.assert_allclose(grad[i, j], (loss(up) - loss(down)) / (2 * eps), rtol=1e-5,
                               atol=1e-10)


@pytest.mark.parametrize("method", block_masks.VARIANTS)
@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_every_target_exact_count_values_dense_or_reweighted(tiny, method, n_m):
  model, calibration, _ = tiny
  layer = layer_weights(model.weights(), 0)
  hidden = model.weights()["embed_tokens"][calibration]
  solver = dataclasses.replace(SMALL, target="local")
  result = block_masks.solve_block(layer, hidden, method=method, targets=ALL, sparsity=0.5,
                                   n_m=n_m, config=TINY_LLAMA, solver=solver)
  assert set(result.weights) == set(result.keep) == set(ALL)
  assert result.loss.shape == (2 * (2 * 3 + (2 if method == "attn-block-reweight" else 0)),)
  for name in ALL:
    keep, w = np.asarray(result.keep[name]), np.asarray(result.weights[name])
    if n_m is None:
      assert (keep.sum(-1) == keep.shape[1] // 2).all(), name
    else:
      assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all(), name
    assert (w[~keep] == 0).all()
    dense = np.asarray(layer[name])
    if method == "attn-block":
      np.testing.assert_array_equal(w[keep], dense[keep])
    else:
      assert not np.allclose(w[keep], dense[keep])  # re-weighted on the support


def test_targets_of_one_half_leave_the_other_dense(tiny):
  model, calibration, _ = tiny
  layer = layer_weights(model.weights(), 0)
  hidden = model.weights()["embed_tokens"][calibration]
  result = block_masks.solve_block(layer, hidden, method="attn-block", targets=("v_proj",),
                                   sparsity=0.5, config=TINY_LLAMA,
                                   solver=dataclasses.replace(SMALL, target="local"))
  assert set(result.weights) == {"v_proj"}
  assert result.loss.shape == (2 * 3,)  # the MLP half has no masks: no steps


def test_teacher_targets_follow_the_dense_stream(tiny):
  """On the first pruned layer the pruned and dense streams agree: teacher = local; after a
  pruned layer they differ, and the teacher's first loss counts the upstream error."""
  model, calibration, heldout = tiny
  runs = {target: prune_model(model, PruneSettings(
      "attn-block", 0.5, layers=(0, 1), targets="all",
      solver=dataclasses.replace(SMALL, target=target)), calibration, heldout)
      for target in ("teacher", "local")}
  first = [runs[t].layers[0] for t in ("teacher", "local")]
  assert first[0]["kept"] == first[1]["kept"]
  np.testing.assert_allclose(first[0]["loss_first"], first[1]["loss_first"], atol=1e-6)
  assert first[0]["loss_first"] < 1e-6  # all masks 1: the dense layer, on dense inputs
  assert runs["teacher"].layers[1]["loss_first"] > 1e-3 > runs["local"].layers[1]["loss_first"]
  # The targets agree to rounding ((h + y) − h against y): masks agree but for near-ties.
  for name in ALL:
    same = np.asarray(runs["teacher"].weights[name][0] != 0) == np.asarray(
        runs["local"].weights[name][0] != 0)
    assert same.mean() > 0.95, name


def test_block_methods_are_registered_and_refuse_bad_settings():
  assert methods.names("block") == ("attn-block", "attn-block-reweight")
  assert methods.get("attn-block-reweight").changes_values
  with pytest.raises(InputError, match="prunes every target of a block itself"):
    PruneSettings("attn-block", 0.5, targets="all", rest="wanda")
  with pytest.raises(InputError, match="sequential already"):
    PruneSettings("attn-block", 0.5, targets="all", true_sequential=True)
  with pytest.raises(InputError, match="solver must be a BlockSolverConfig"):
    from attnprune_jax.solver_config import MaskSolverConfig
    PruneSettings("attn-block", 0.5, targets="all", solver=MaskSolverConfig())
  with pytest.raises(InputError, match="target must be one of"):
    BlockSolverConfig(target="teachers")
  with pytest.raises(InputError, match="needs the dense model's residual stream"):
    block_masks.solve_block({}, np.zeros((2, 3, 16)), method="attn-block", targets=("q_proj",),
                            sparsity=0.5, config=TINY_LLAMA, solver=SMALL)
