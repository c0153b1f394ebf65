"""The factored q/k objective of a real layer against the model's own attention and a plain
numpy Llama; its gradient against finite differences; the three attention-aware methods."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnprune_jax import layer_masks, objective, solver
from attnprune_jax.attention import layer_attention
from attnprune_jax.errors import DivergenceError
from attnprune_jax.layer_masks import prune_schedule, solve_layer
from attnprune_jax.solver_config import MaskSolverConfig
from attnprune_jax.models.llama import Llama, LlamaConfig
from attnprune_jax.objective import factored_loss, kv_groups
import reference_numpy


def tiny_config(heads, kv_heads):
  return LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_layers=2,
                     num_heads=heads, num_kv_heads=kv_heads, head_dim=4, rope_base=10000.0,
                     rms_eps=1e-5)


CONFIGS = {"mha": tiny_config(2, 2), "gqa": tiny_config(4, 2)}


def layer_problem(name, seed=0, windows=2, t=6, dtype=jnp.float32):
  """A tiny random model's layer-1 q/k, its captured attention inputs and the tokens."""
  config = CONFIGS[name]
  model = Llama.random(config, jax.random.key(seed), scale=0.5, dtype=dtype)
  tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (windows, t))
  _, captured = model(tokens, return_attention_inputs=True, return_attention=True)
  weights = model.weights()
  return config, model, tokens, weights, captured


def group_loss(config, masks, weights, x, lam):
  """Σ over KV groups of the factored loss, as the solver computes it."""
  q_groups, k_groups = kv_groups(weights["q_proj"][1], weights["k_proj"][1], config.num_kv_heads)
  mq, mk = kv_groups(masks["q_proj"], masks["k_proj"], config.num_kv_heads)
  attention = functools.partial(layer_attention, head_dim=config.head_dim,
                                rope=config.rope)
  total = 0.0
  for g in range(config.num_kv_heads):
    target = attention(x, q_groups[g], k_groups[g])
    total += factored_loss({"q_proj": mq[g], "k_proj": mk[g]}, q_groups[g], k_groups[g], x,
                           target, lam, head_dim=config.head_dim, rope=config.rope)
  return total


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_attention_matches_a_numpy_llama_head_by_head(name):
  config, _, tokens, weights, captured = layer_problem(name, dtype=jnp.float64)
  x = captured["attention_inputs"][1]
  probs = layer_attention(x, weights["q_proj"][1], weights["k_proj"][1],
                          head_dim=config.head_dim, rope=config.rope)
  for window, window_probs in zip(tokens, probs):
    _, _, expected = reference_numpy.llama_forward(weights, window, config)
    np.testing.assert_allclose(window_probs, expected[1], rtol=1e-10, atol=1e-13)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_factored_loss_is_zero_at_ones_and_matches_numpy_llama(name):
  config, _, tokens, weights, captured = layer_problem(name, dtype=jnp.float64)
  x = captured["attention_inputs"][1]
  ones = {"q_proj": jnp.ones_like(weights["q_proj"][1]),
          "k_proj": jnp.ones_like(weights["k_proj"][1])}
  assert float(group_loss(config, ones, weights, x, 0.0)) == 0.0
  rng = np.random.default_rng(1)
  masks = {key: jnp.asarray(rng.uniform(0, 1.5, value.shape)) for key, value in ones.items()}
  lam = 0.3
  # Independent reference: the numpy Llama with masked q/k of layer 1 on the same inputs.
  masked = {key: np.asarray(value) for key, value in weights.items()}
  masked["q_proj"] = masked["q_proj"].copy()
  masked["k_proj"] = masked["k_proj"].copy()
  masked["q_proj"][1] *= np.asarray(masks["q_proj"])
  masked["k_proj"][1] *= np.asarray(masks["k_proj"])
  expected = 0.0
  for window in tokens:
    _, _, dense = reference_numpy.llama_forward(weights, window, config)
    _, _, pruned = reference_numpy.llama_forward(masked, window, config)
    expected += 0.5 * np.sum((pruned[1] - dense[1])**2)
  expected += 0.5 * lam * sum(np.sum(np.asarray(m)**2) for m in masks.values())
  np.testing.assert_allclose(group_loss(config, masks, weights, x, lam), expected, rtol=1e-10)


@pytest.mark.usefixtures("x64")
def test_factored_gradient_matches_finite_differences():
  config, _, _, weights, captured = layer_problem("gqa", seed=3, dtype=jnp.float64)
  x = captured["attention_inputs"][1]
  rng = np.random.default_rng(2)
  masks = {"q_proj": jnp.asarray(rng.uniform(0.5, 1.5, weights["q_proj"][1].shape)),
           "k_proj": jnp.asarray(rng.uniform(0.5, 1.5, weights["k_proj"][1].shape))}
  loss = functools.partial(group_loss, config, weights=weights, x=x, lam=0.1)
  grads = jax.grad(lambda m: loss(m))(masks)
  for key, index in [("q_proj", (0, 3)), ("q_proj", (9, 14)), ("k_proj", (2, 5)),
                     ("k_proj", (7, 0))]:
    h = 1e-6
    plus = {k: v.at[index].add(h) if k == key else v for k, v in masks.items()}
    minus = {k: v.at[index].add(-h) if k == key else v for k, v in masks.items()}
    numeric = (loss(plus) - loss(minus)) / (2 * h)
    np.testing.assert_allclose(grads[key][index], numeric, rtol=1e-6, atol=1e-12)


def test_prune_schedule():
  assert prune_schedule(0.5, (2, 4), 8) == (None,) * 3 + ((0.25, (1, 4)),) + (None,) * 3 + (
      (0.5, (2, 4)),)
  assert prune_schedule(0.5, (2, 4), 1) == ((0.5, (2, 4)),)
  schedule = prune_schedule(0.7, None, 4)
  assert [n_m for _, n_m in schedule] == [None] * 4 and schedule[-1][0] == 0.7
  assert [s for s, _ in schedule] == sorted(s for s, _ in schedule)


SMALL = MaskSolverConfig(steps=6, rounds=3, steps_per_round=4, reweight_steps=5,
                         windows_per_step=1)


# Each method unstructured; N:M where it goes its own way (the progressive N:M schedule, and the
# re-weighting on an N:M support). `attn`'s N:M cut is `binarize`'s, tested in test_masks.
@pytest.mark.parametrize("method,n_m", [
    ("attn", None), ("attn-progressive", None), ("attn-reweight", None),
    ("attn-progressive", (2, 4)), ("attn-reweight", (2, 4))])
def test_methods_keep_exact_counts_and_their_kind_of_weights(method, n_m):
  config, _, _, weights, captured = layer_problem("gqa", seed=5)
  x = captured["attention_inputs"][1]
  q, k = weights["q_proj"][1], weights["k_proj"][1]
  result = solve_layer(q, k, x, method=method, sparsity=0.5, n_m=n_m, config=SMALL,
                       num_kv_heads=2, head_dim=4, rope=config.rope)
  for keep, new, dense in [(result.keep_q, result.q_proj, q), (result.keep_k, result.k_proj, k)]:
    keep = np.asarray(keep)
    if n_m is None:
      assert (keep.sum(-1) == dense.shape[1] // 2).all()
    else:
      assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()
    assert (np.asarray(new)[~keep] == 0).all()
    if method == "attn-reweight":
      assert not np.allclose(np.asarray(new)[keep], np.asarray(dense)[keep])
    else:
      np.testing.assert_array_equal(np.asarray(new)[keep], np.asarray(dense)[keep])
  expected_steps = {"attn": 6, "attn-progressive": 12, "attn-reweight": 12 + 5}[method]
  assert result.loss.shape == (expected_steps,) and np.isfinite(result.loss).all()


def test_progressive_lowers_the_attention_error_of_its_first_cut():
  """Rounds of optimization between prune steps beat one cut by the same score at M = 1 (which
  is Wanda's score |W|·‖X_j‖) on the calibration loss."""
  config, _, _, weights, captured = layer_problem("gqa", seed=7, windows=2, t=8)
  x = captured["attention_inputs"][1]
  q, k = weights["q_proj"][1], weights["k_proj"][1]
  layout = dict(num_kv_heads=2, head_dim=4, rope=config.rope)

  def error(result):
    masks = {"q_proj": result.q_proj / jnp.where(q == 0, 1, q),
             "k_proj": result.k_proj / jnp.where(k == 0, 1, k)}
    return float(group_loss(config, masks, weights, x, 0.0))

  cut = solve_layer(q, k, x, method="attn-progressive", sparsity=0.6,
                    config=MaskSolverConfig(rounds=1, steps_per_round=1, windows_per_step=1),
                    **layout)
  progressive = solve_layer(q, k, x, method="attn-progressive", sparsity=0.6,
                            config=MaskSolverConfig(rounds=4, steps_per_round=10, lr=3e-2,
                                                    windows_per_step=2), **layout)
  assert error(progressive) < 0.9 * error(cut)


def test_bad_inputs_name_the_argument():
  config, _, _, weights, captured = layer_problem("gqa")
  x = captured["attention_inputs"][1]
  q, k = weights["q_proj"][1], weights["k_proj"][1]
  layout = dict(num_kv_heads=2, head_dim=4, rope=config.rope)
  with pytest.raises(ValueError, match="method must be one of"):
    solve_layer(q, k, x, method="wanda", sparsity=0.5, **layout)
  with pytest.raises(ValueError, match="sparsity must be in"):
    solve_layer(q, k, x, method="attn", sparsity=1.0, **layout)
  with pytest.raises(ValueError, match="windows_per_step"):
    solve_layer(q, k, x, method="attn", sparsity=0.5,
                config=MaskSolverConfig(windows_per_step=3), **layout)
  with pytest.raises(ValueError, match="k_proj must have"):
    solve_layer(q, k[:4], x, method="attn", sparsity=0.5, **layout)
  with pytest.raises(ValueError, match="x contains NaN"):
    solve_layer(q, k, x.at[0, 0, 0].set(jnp.nan), method="attn", sparsity=0.5, **layout)
  with pytest.raises(ValueError, match="optimizer must be one of"):
    MaskSolverConfig(optimizer="lbfgs")
  with pytest.raises(ValueError, match="lr must be > 0"):
    MaskSolverConfig(lr=0.0)


def test_reweighting_starts_from_the_binary_mask_not_the_shrunk_values():
  config, _, _, weights, captured = layer_problem("gqa", seed=4)
  x = captured["attention_inputs"][1]
  q, k = weights["q_proj"][1], weights["k_proj"][1]
  layout = dict(num_kv_heads=2, head_dim=4, rope=config.rope)
  # λ shrinks the masks during the progressive rounds; re-weighting restarts from 1 on the
  # support, so after one Adam step (size about lr) the values are still near the dense ones.
  solver = MaskSolverConfig(lam=0.5, lr=0.05, rounds=2, steps_per_round=5, reweight_steps=1,
                            windows_per_step=1)
  progressive = solve_layer(q, k, x, method="attn-progressive", sparsity=0.5, config=solver,
                            **layout)
  reweighted = solve_layer(q, k, x, method="attn-reweight", sparsity=0.5, config=solver,
                           **layout)
  np.testing.assert_array_equal(reweighted.keep_q, progressive.keep_q)
  keep = np.asarray(reweighted.keep_q)
  ratio = np.asarray(reweighted.q_proj)[keep] / np.asarray(q)[keep]
  # One Adam step moves each value by at most about lr from 1.
  assert np.all(np.abs(ratio - 1) <= 0.05 * 1.01)


# The check and the NaN marking are shared by the methods: the single-cut and the longest path.
@pytest.mark.parametrize("method", ["attn", "attn-reweight"])
def test_divergence_is_an_error_naming_lr(method):
  config, _, _, weights, captured = layer_problem("gqa", seed=6)
  x = captured["attention_inputs"][1]
  q, k = weights["q_proj"][1], weights["k_proj"][1]
  diverging = dataclasses.replace(SMALL, optimizer="sgd", lr=1e30)
  with pytest.raises(DivergenceError, match=rf"{method} diverged: .* optimizer=sgd lr=1e\+30"):
    solve_layer(q, k, x, method=method, sparsity=0.5, config=diverging, num_kv_heads=2,
                head_dim=4, rope=config.rope)


def test_half_precision_layers_are_solved_in_float32():
  config, _, _, weights, captured = layer_problem("mha", seed=7)
  x = captured["attention_inputs"][1].astype(jnp.bfloat16)
  q, k = weights["q_proj"][1].astype(jnp.bfloat16), weights["k_proj"][1].astype(jnp.bfloat16)
  result = solve_layer(q, k, x, method="attn-progressive", sparsity=0.5, config=SMALL,
                       num_kv_heads=2, head_dim=4, rope=config.rope)
  reference = solve_layer(q.astype(jnp.float32), k.astype(jnp.float32), x.astype(jnp.float32),
                          method="attn-progressive", sparsity=0.5, config=SMALL,
                          num_kv_heads=2, head_dim=4, rope=config.rope)
  assert result.loss.dtype == jnp.float32
  np.testing.assert_array_equal(result.keep_q, reference.keep_q)
  np.testing.assert_array_equal(result.keep_k, reference.keep_k)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("block", [1, 4, 6, 16])  # one row, padded rows, one block, one big
def test_row_blocked_factored_loss_and_gradient_equal_the_dense_ones(block):
  config, _, _, weights, captured = layer_problem("gqa", seed=5, t=6, dtype=jnp.float64)
  x = captured["attention_inputs"][1]
  q_groups, k_groups = kv_groups(weights["q_proj"][1], weights["k_proj"][1], config.num_kv_heads)
  rng = np.random.default_rng(3)
  masks = {"q_proj": jnp.asarray(rng.uniform(0, 1.5, q_groups[0].shape)),
           "k_proj": jnp.asarray(rng.uniform(0, 1.5, k_groups[0].shape))}
  layout = {"head_dim": config.head_dim, "rope": config.rope}
  target = layer_attention(x, q_groups[0], k_groups[0], **layout)
  dense = jax.value_and_grad(factored_loss)(masks, q_groups[0], k_groups[0], x, target, 0.2,
                                            **layout)
  blocked = jax.jit(jax.value_and_grad(objective.blocked_factored_loss),
                    static_argnames=("head_dim", "rope", "block"))(
      masks, q_groups[0], k_groups[0], x, 0.2, **layout, block=block)
  np.testing.assert_allclose(blocked[0], dense[0], rtol=1e-12)
  for name in masks:
    np.testing.assert_allclose(blocked[1][name], dense[1][name], rtol=1e-10, atol=1e-14)
  pruned = {name: masks[name] * w for name, w in (("q_proj", q_groups[0]),
                                                 ("k_proj", k_groups[0]))}
  np.testing.assert_allclose(
      objective.layer_attention_error(pruned["q_proj"], pruned["k_proj"], q_groups[0],
                                      k_groups[0], x, **layout, block=block),
      objective.layer_attention_error(pruned["q_proj"], pruned["k_proj"], q_groups[0],
                                      k_groups[0], x, **layout), rtol=1e-12)


def test_row_blocked_factored_step_needs_far_less_memory_than_the_attention():
  b, t, d, hd, group = 2, 2048, 32, 8, 3
  x = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  q, k = jax.ShapeDtypeStruct((group * hd, d), jnp.float32), jax.ShapeDtypeStruct((hd, d),
                                                                                   jnp.float32)
  layout = {"head_dim": hd, "rope": 1e4}

  def temp_bytes(loss):
    step = jax.value_and_grad(lambda m, q, k, x: loss({"q_proj": m, "k_proj": jnp.ones(k.shape)},
                                                      q, k, x))
    return jax.jit(step).lower(q, q, k, x).compile().memory_analysis().temp_size_in_bytes

  blocked = temp_bytes(lambda m, q, k, x: objective.blocked_factored_loss(
      m, q, k, x, 0.1, **layout, block=32))
  dense = temp_bytes(lambda m, q, k, x: factored_loss(
      m, q, k, x, layer_attention(x, q, k, **layout), 0.1, **layout))
  attention = b * group * t * t * 4
  assert dense >= 2 * attention
  assert blocked < attention / 4, (blocked, attention)  # O(b·group·block·t): about 1/8


def test_solve_layer_blocks_long_windows_by_default_with_the_same_masks(monkeypatch):
  config, _, _, weights, captured = layer_problem("gqa", seed=6, t=12)
  x = captured["attention_inputs"][1]
  solve = functools.partial(solve_layer, weights["q_proj"][1], weights["k_proj"][1], x,
                            method="attn", sparsity=0.5, config=SMALL, num_kv_heads=2,
                            head_dim=4, rope=config.rope)
  blocks = []
  real = layer_masks._solve_layer
  monkeypatch.setattr(layer_masks, "_solve_layer",
                      lambda *a, **kw: blocks.append(kw["block"]) or real(*a, **kw))
  dense = solve()
  monkeypatch.setattr(solver, "BLOCKED_ABOVE", 11)
  blocked = solve()
  assert blocks == [None, solver.DEFAULT_BLOCK]
  np.testing.assert_allclose(blocked.loss, dense.loss, rtol=1e-5)
  np.testing.assert_array_equal(blocked.keep_q, dense.keep_q)
  np.testing.assert_array_equal(blocked.keep_k, dense.keep_k)


def test_blocked_attention_error_takes_bfloat16_inputs_like_the_dense_one():
  config, _, _, weights, captured = layer_problem("gqa", seed=8, t=6)
  x = captured["attention_inputs"][1].astype(jnp.bfloat16)
  q, k = weights["q_proj"][1], weights["k_proj"][1]
  layout = {"head_dim": config.head_dim, "rope": config.rope}
  dense = objective.layer_attention_error(0.5 * q, k, q, k, x, **layout)
  blocked = objective.layer_attention_error(0.5 * q, k, q, k, x, **layout, block=4)
  assert blocked.dtype == dense.dtype == jnp.float32
  np.testing.assert_allclose(blocked, dense, rtol=1e-5)
