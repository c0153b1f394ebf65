"""solve_mask (Algorithm 1) against a plain reference loop: heads, monotone descent, optax, no
recompiles; progressive sparsification; float32 solutions against float64 ones."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attnprune_jax as ap
from attnprune_jax import objective, solver
from attnprune_jax.attention import softmax_attention
from attnprune_jax.errors import DivergenceError, InputError
from attnprune_jax.theory import smoothness_measured
from conftest import random_problem


def gradient_descent_reference(w, x, *, lam, steps, lr, causal=True):
  """Algorithm 1 as a Python loop over the public loss and gradient, step by step."""
  mask = np.ones_like(w)
  losses, norms = [], []
  for _ in range(steps):
    grad = np.asarray(ap.pruning_grad(mask, w, x, lam=lam, causal=causal))
    losses.append(float(ap.pruning_loss(mask, w, x, lam=lam, causal=causal)))
    norms.append(float(np.linalg.norm(grad)))
    mask = mask - lr * grad
  return mask, np.array(losses), np.array(norms)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("causal", [True, False])
def test_matches_python_gradient_descent(causal):
  # float64: here η = 0.05 is above 2/L_s (L_s ≈ 70-150 along the path), so gradient descent
  # amplifies any rounding difference; in float64 the jitted scan and the loop agree to 1e-12.
  _, w, x = random_problem(20, n=8, d=5, batch=2, scale=3.0, dtype=np.float64)
  result = ap.solve_mask(w, x, lam=0.1, steps=25, lr=0.05, causal=causal)
  mask, losses, norms = gradient_descent_reference(w, x, lam=0.1, steps=25, lr=0.05,
                                                   causal=causal)
  np.testing.assert_allclose(result.mask, mask, rtol=1e-12)
  np.testing.assert_allclose(result.loss, losses, rtol=1e-12)
  np.testing.assert_allclose(result.grad_norm, norms, rtol=1e-10)
  # Not a uniform shrinkage (1 − ηλ)^t: the attention term moved the entries apart.
  assert np.ptp(mask) > 1e-3


def test_heads_are_solved_independently():
  _, _, x = random_problem(21, n=8, d=5, batch=2)
  ws = np.stack([random_problem(s, d=5, scale=3.0)[1] for s in (1, 2, 3)])
  stacked = ap.solve_mask(ws, x, lam=0.05, steps=15, lr=0.1)
  assert stacked.mask.shape == (3, 5, 5)
  assert stacked.loss.shape == stacked.grad_norm.shape == (3, 15)
  for h in range(3):
    alone = ap.solve_mask(ws[h], x, lam=0.05, steps=15, lr=0.1)
    np.testing.assert_allclose(stacked.mask[h], alone.mask, rtol=1e-6)
    np.testing.assert_allclose(stacked.loss[h], alone.loss, rtol=1e-6)
    np.testing.assert_allclose(stacked.grad_norm[h], alone.grad_norm, rtol=1e-6)
  lrs = np.array([0.1, 0.03, 0.2])  # one step size per head
  per_head = ap.solve_mask(ws, x, lam=0.05, steps=15, lr=lrs)
  for h in range(3):
    alone = ap.solve_mask(ws[h], x, lam=0.05, steps=15, lr=lrs[h])
    np.testing.assert_allclose(per_head.loss[h], alone.loss, rtol=1e-6)
    np.testing.assert_allclose(per_head.mask[h], alone.mask, rtol=1e-6)
  traced = jax.jit(lambda lr: ap.solve_mask(ws, x, lam=0.05, steps=15, lr=lr).loss)(lrs)
  np.testing.assert_allclose(traced, per_head.loss, rtol=1e-6)
  with pytest.raises(InputError, match=r"one step size per head \(3,\)"):  # shapes are checked
    jax.jit(lambda lr: ap.solve_mask(ws, x, lam=0.05, steps=15, lr=lr).loss)(lrs[:2])
  for lr, message in ((lrs[:2], r"one step size per head \(3,\)"), (-lrs, "lr must be > 0"),
                      (np.array([0.1, np.nan, 0.1]), "lr contains NaN")):
    with pytest.raises(InputError, match=message):
      ap.solve_mask(ws, x, lam=0.05, steps=15, lr=lr)
  with pytest.raises(InputError, match="lr must be a scalar for one head"):
    ap.solve_mask(ws[0], x, lam=0.05, steps=15, lr=lrs)


def test_loss_decreases_monotonically_below_one_over_smoothness():
  _, w, x = random_problem(22, n=12, d=6, batch=2, scale=3.0)
  lam, steps = 0.05, 200
  key = jax.random.key(0)
  # Estimate L_s as the largest Hessian norm seen at M0 and along a pilot trajectory.
  pilot = ap.solve_mask(w, x, lam=lam, steps=steps, lr=1e-3)
  points = [np.ones_like(w), np.asarray(pilot.mask), 0.5 * np.ones_like(w)]
  smoothness = max(float(smoothness_measured(p, w, x, lam=lam, key=key)) for p in points)
  result = ap.solve_mask(w, x, lam=lam, steps=steps, lr=1.0 / smoothness)
  decrease = -np.diff(np.asarray(result.loss))
  assert (decrease >= -1e-6 * result.loss[0]).all(), decrease.min()  # a few float32 ulps
  assert result.loss[-1] < 0.9 * result.loss[0]


def test_runs_unjitted_and_agrees():
  _, w, x = random_problem(23, n=6, d=4, batch=2, scale=3.0)
  jitted = ap.solve_mask(w, x, lam=0.1, steps=3, lr=0.1)
  with jax.disable_jit():
    eager = ap.solve_mask(w, x, lam=0.1, steps=3, lr=0.1)
  for a, b in zip(jitted, eager):
    # float32: XLA fuses the scan differently from op-by-op execution (seen: 8e-8 relative).
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_works_inside_jit_with_traced_hyperparameters():
  _, w, x = random_problem(24, n=6, d=4, batch=2, scale=3.0)
  run = jax.jit(lambda w, x, lam, lr: ap.solve_mask(w, x, lam=lam, steps=5, lr=lr))
  for a, b in zip(run(w, x, 0.1, 0.2), ap.solve_mask(w, x, lam=0.1, steps=5, lr=0.2)):
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_any_optax_optimizer_is_accepted():
  _, w, x = random_problem(25, n=6, d=4, batch=2, scale=3.0)
  adam = optax.adam(0.01)
  result = ap.solve_mask(w, x, lam=0.1, steps=10, optimizer=adam)
  mask, state = np.ones_like(w), adam.init(np.ones_like(w))
  for _ in range(10):
    updates, state = adam.update(ap.pruning_grad(mask, w, x, lam=0.1), state, mask)
    mask = optax.apply_updates(mask, updates)
  np.testing.assert_allclose(result.mask, mask, rtol=1e-5)  # float32 jitted scan against a loop
  plain = ap.solve_mask(w, x, lam=0.1, steps=10, lr=0.01)
  assert not np.allclose(result.mask, plain.mask)


def test_same_shapes_do_not_recompile():
  _, w, x = random_problem(26, n=6, d=4, batch=2, scale=3.0)
  ap.solve_mask(w, x, lam=0.1, steps=7, lr=0.1)
  compiled = solver._solve._cache_size()
  ap.solve_mask(w, x, lam=0.3, steps=7, lr=0.05)
  ap.solve_mask(2 * w, x + 1, lam=0.0, steps=7, lr=1)
  assert solver._solve._cache_size() == compiled
  ap.solve_mask(w, x, lam=0.1, steps=8, lr=0.1)
  assert solver._solve._cache_size() == compiled + 1


@pytest.mark.usefixtures("x64")
def test_float32_stays_float32():
  # With float64 available, float32 inputs must still not be promoted to it.
  _, w, x = random_problem(27, n=6, d=4, batch=2)
  result = ap.solve_mask(w, x, lam=0.1, steps=3, lr=0.1)
  assert all(field.dtype == jnp.float32 for field in result)


def test_segments_continued_from_init_equal_one_solve():
  _, w, x = random_problem(28, n=6, d=4, batch=2, scale=3.0)
  whole = ap.solve_mask(w, x, lam=0.1, steps=12, lr=0.1)
  first = ap.solve_mask(w, x, lam=0.1, steps=6, lr=0.1)
  second = ap.solve_mask(w, x, lam=0.1, steps=6, lr=0.1, init=first.mask)
  np.testing.assert_allclose(second.mask, whole.mask, rtol=1e-12)
  np.testing.assert_allclose(np.concatenate([first.loss, second.loss]), whole.loss, rtol=1e-12)
  with pytest.raises(ValueError, match="init must have w's shape"):
    ap.solve_mask(w, x, lam=0.1, steps=2, lr=0.1, init=first.mask[:2])


def test_cubic_schedule():
  schedule = solver.cubic_schedule(0.8, 4)
  np.testing.assert_allclose(schedule, [0.8 * (1 - (1 - r / 4)**3) for r in range(1, 5)])
  assert schedule[-1] == 0.8 and list(schedule) == sorted(schedule)


def test_progressive_matches_a_python_reference_and_keeps_exact_counts():
  _, w, x = random_problem(29, n=8, d=8, batch=2, scale=3.0)
  lam, lr, sparsity, rounds, steps = 0.01, 0.05, 0.5, 3, 4
  result = solver.solve_mask_progressive(w, x, sparsity=sparsity, lam=lam, lr=lr,
                                         rounds=rounds, steps_per_round=steps)
  norms = np.linalg.norm(x.reshape(-1, 8), axis=0)
  mask, keep, losses = np.ones_like(w), np.ones(w.shape, bool), []
  for round_sparsity in solver.cubic_schedule(sparsity, rounds):
    for _ in range(steps):
      losses.append(float(ap.pruning_loss(mask, w, x, lam=lam)))
      mask = mask - lr * np.where(keep, ap.pruning_grad(mask, w, x, lam=lam), 0)
    score = np.where(keep, np.abs(mask * w) * np.outer(norms, norms), -1.0)
    keep = np.asarray(ap.binarize(score, round_sparsity))
    mask = np.where(keep, mask, 0)
  np.testing.assert_array_equal(result.keep, keep)
  # float32: the jitted rounds against a loop of eager calls, a few ulps apart.
  np.testing.assert_allclose(result.mask, mask, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(result.loss, losses, rtol=1e-5)
  assert (np.asarray(result.keep).sum(-1) == 4).all()
  assert (np.asarray(result.mask)[~np.asarray(result.keep)] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
def test_float32_solutions_match_float64(causal):
  # Three heads solved from the same float32 inputs in float32 and in float64, with η = 0.5/L̂
  # (L̂ measured at M₀, as the demo does). Below 1/L_s gradient descent contracts and rounding
  # is not amplified (above 2/L_s a 1e-7 change of M₀ moves M_T by 1e-2, even in float64).
  # Seen over 12 such problems: errors at most 6e-7 of the largest value; 1e-5 keeps a 15-fold
  # margin, and the solution moves far more than that (spread of M_T: 1e-2 to 0.2).
  _, _, x = random_problem(40, n=12, d=6, batch=2)
  ws = np.stack([random_problem(seed, n=12, d=6, scale=3.0)[1] for seed in (41, 42, 43)])
  lam, steps = 0.05, 100
  smoothness = max(float(smoothness_measured(np.ones_like(w), w, x, lam=lam, causal=causal,
                                             key=jax.random.key(0))) for w in ws)
  lr = 0.5 / smoothness
  solution = ap.solve_mask(ws, x, lam=lam, steps=steps, lr=lr, causal=causal)
  progressive = [solver.solve_mask_progressive(w, x, sparsity=0.5, lam=lam, lr=lr, rounds=3,
                                               steps_per_round=20, causal=causal) for w in ws]
  with jax.enable_x64(True):
    x64 = x.astype(np.float64)
    want = ap.solve_mask(ws.astype(np.float64), x64, lam=lam, steps=steps, lr=lr, causal=causal)
    want_progressive = [
        solver.solve_mask_progressive(w.astype(np.float64), x64, sparsity=0.5, lam=lam, lr=lr,
                                      rounds=3, steps_per_round=20, causal=causal) for w in ws]
  assert solution.mask.dtype == jnp.float32 and want.mask.dtype == jnp.float64
  assert np.ptp(want.mask, axis=(1, 2)).min() > 1e-2
  for got, expected in zip(solution, want):
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
  for got, expected in zip(progressive, want_progressive):
    # The kept sets agree exactly: no two scores of these problems are within float32 rounding.
    np.testing.assert_array_equal(got.keep, expected.keep)
    np.testing.assert_allclose(got.mask, expected.mask, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.loss, expected.loss, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_inputs_are_solved_in_float32(dtype):
  # In half precision a step of ~1e-3 is below the resolution of 1.0: M would stay M₀.
  _, w, x = random_problem(31, n=12, d=6, batch=2, scale=3.0, dtype=np.float32)
  half_w, half_x = jnp.asarray(w, dtype), jnp.asarray(x, dtype)
  half = ap.solve_mask(half_w, half_x, lam=1e-2, steps=40, lr=0.1)
  full = ap.solve_mask(half_w.astype(jnp.float32), half_x.astype(jnp.float32), lam=1e-2,
                       steps=40, lr=0.1)
  assert half.mask.dtype == jnp.float32 and half.loss.dtype == jnp.float32
  assert float(jnp.abs(half.mask - 1).max()) > 0.02
  np.testing.assert_array_equal(half.mask, full.mask)
  progressive = solver.solve_mask_progressive(half_w, half_x, sparsity=0.5, lam=1e-2, lr=0.1,
                                              rounds=2, steps_per_round=5)
  reference = solver.solve_mask_progressive(half_w.astype(jnp.float32),
                                            half_x.astype(jnp.float32), sparsity=0.5,
                                            lam=1e-2, lr=0.1, rounds=2, steps_per_round=5)
  np.testing.assert_array_equal(progressive.keep, reference.keep)
  loss = ap.pruning_loss(half.mask, half_w, half_x, lam=1e-2)
  assert loss.dtype == jnp.float32


@pytest.mark.parametrize("block", [None, 5])
def test_bfloat16_compute_follows_its_own_gradient_in_float32(block):
  _, w, x = random_problem(33, n=12, d=6, batch=2, scale=3.0, dtype=np.float32)
  solution = ap.solve_mask(w, x, lam=1e-2, steps=6, lr=0.1, block=block,
                           compute_dtype="bfloat16")
  assert solution.mask.dtype == solution.loss.dtype == jnp.float32
  # Step by step with the objective's bfloat16 gradient (checked against numpy there).
  mask, x_bf16 = jnp.ones_like(w), jnp.asarray(x, jnp.bfloat16)
  target = softmax_attention(x_bf16, w, causal=True, compute_dtype=jnp.bfloat16)
  for step in range(6):
    loss, grad = objective.merged_loss_and_grad(mask, w, x_bf16, target, 1e-2, True,
                                                jnp.bfloat16)
    np.testing.assert_allclose(solution.loss[step], loss, rtol=1e-5)
    mask = mask - 0.1 * grad
  np.testing.assert_allclose(solution.mask, mask, rtol=0, atol=1e-5)
  float32 = ap.solve_mask(w, x, lam=1e-2, steps=6, lr=0.1, block=block)
  assert float(jnp.abs(float32.mask - solution.mask).max()) > 1e-4
  assert ap.solve_mask(w, x, lam=1e-2, steps=6, lr=0.1, block=block,
                       compute_dtype="float32").mask.tolist() == float32.mask.tolist()


@pytest.mark.parametrize("bad", ["float16", "int8", "fast", 3])
def test_bad_compute_dtype_is_named(bad):
  _, w, x = random_problem(34, n=6, d=4)
  with pytest.raises(InputError,
                     match="compute_dtype must be None, 'float32', 'float64' or 'bfloat16'"):
    ap.solve_mask(w, x, lam=1e-2, steps=2, lr=0.1, compute_dtype=bad)


def test_divergence_is_an_error_naming_the_step_size():
  _, w, x = random_problem(32, n=10, d=6, batch=2, scale=3.0, dtype=np.float32)
  with pytest.raises(DivergenceError, match=r"NaN or Inf .* lr=1e\+30"):
    ap.solve_mask(w, x, lam=1e-2, steps=20, lr=1e30)
  with pytest.raises(DivergenceError, match=r"lr=1e\+30"):
    solver.solve_mask_progressive(w, x, sparsity=0.5, lam=1e-2, lr=1e30, rounds=2,
                                  steps_per_round=3)
  with pytest.raises(DivergenceError, match="the optimizer's step size"):
    ap.solve_mask(np.stack([w, w]), x, lam=1e-2, steps=20, optimizer=optax.sgd(1e30))


def test_a_rising_loss_warns():
  _, w, x = random_problem(33, n=10, d=6, batch=2, scale=3.0, dtype=np.float32)
  smoothness = float(smoothness_measured(np.ones_like(w), w, x, lam=1e-2,
                                         key=jax.random.key(0)))
  with pytest.warns(RuntimeWarning, match=r"the loss rose .* with lr=.*above 1/L_s"):
    solution = ap.solve_mask(w, x, lam=1e-2, steps=30, lr=30 / smoothness)
  assert solution.loss[-1] > solution.loss[0]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ap.solve_mask(w, x, lam=1e-2, steps=30, lr=0.5 / smoothness)


def test_a_rise_in_the_last_update_warns():
  _, w, x = random_problem(34, n=10, d=6, batch=2, scale=3.0, dtype=np.float32)
  with pytest.warns(RuntimeWarning, match=r"the loss rose \(worst: from .*\) with lr=1e\+06"):
    ap.solve_mask(w, x, lam=1e-2, steps=1, lr=1e6)


def test_row_blocked_solve_equals_the_dense_one_and_is_the_default_for_long_windows(monkeypatch):
  _, _, x = random_problem(23, n=13, d=6, batch=2)
  ws = np.stack([random_problem(s, d=6, scale=3.0)[1] for s in (4, 5)])
  lrs = np.array([0.02, 0.04])
  dense = ap.solve_mask(ws, x, lam=0.05, steps=12, lr=lrs)
  blocked = ap.solve_mask(ws, x, lam=0.05, steps=12, lr=lrs, block=4)
  np.testing.assert_allclose(blocked.loss, dense.loss, rtol=1e-5)
  np.testing.assert_allclose(blocked.grad_norm, dense.grad_norm, rtol=1e-4)
  np.testing.assert_allclose(blocked.mask, dense.mask, atol=1e-5)
  with pytest.raises(InputError, match="block must be a positive integer"):
    ap.solve_mask(ws, x, lam=0.05, steps=12, lr=lrs, block=0)
  blocks = []
  solve = solver._solve
  monkeypatch.setattr(solver, "_solve", lambda *args, **kwargs: blocks.append(kwargs["block"])
                      or solve(*args, **kwargs))
  ap.solve_mask(ws, x, lam=0.05, steps=12, lr=lrs)
  monkeypatch.setattr(solver, "BLOCKED_ABOVE", 12)  # n = 13 is now a long window
  default = ap.solve_mask(ws, x, lam=0.05, steps=12, lr=lrs)
  assert blocks == [None, solver.DEFAULT_BLOCK]
  np.testing.assert_allclose(default.loss, dense.loss, rtol=1e-5)
