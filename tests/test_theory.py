"""theory: measured smoothness vs the dense Hessian, derived bounds and rates on known cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnprune_jax as ap
from attnprune_jax import theory
from attnprune_jax.errors import InputError
from attnprune_jax.theory import smoothness_measured
from conftest import random_problem


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_power_iteration_matches_dense_hessian(causal, seed):
  mask, w, x = random_problem(30 + seed, n=6, d=3, batch=2, scale=3.0, dtype=np.float64)
  loss = functools.partial(ap.pruning_loss, w=w, x=x, lam=0.02, causal=causal)
  hessian = jax.jit(jax.hessian(loss))(mask).reshape(mask.size, mask.size)
  np.testing.assert_allclose(hessian, hessian.T, atol=1e-12)
  want = np.abs(np.linalg.eigvalsh(hessian)).max()
  got = smoothness_measured(mask, w, x, lam=0.02, causal=causal, key=jax.random.key(seed),
                            iters=2000)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_power_iteration_on_a_stack_of_heads_equals_each_head_alone():
  _, _, x = random_problem(33, n=6, d=4, batch=2)
  ws = np.stack([random_problem(s, d=4, scale=3.0)[1] for s in (1, 2)])
  masks = np.stack([np.ones((4, 4)), 0.5 * np.ones((4, 4))]).astype(np.float32)
  key = jax.random.key(3)
  stacked = smoothness_measured(masks, ws, x, lam=0.1, key=key, iters=30)
  assert stacked.shape == (2,)
  for h in range(2):
    alone = smoothness_measured(masks[h], ws[h], x, lam=0.1, key=key, iters=30)
    np.testing.assert_allclose(stacked[h], alone, rtol=1e-5)
  with pytest.raises(InputError, match=r"mask must have w's shape \(2, 4, 4\)"):
    smoothness_measured(masks[:1], ws, x, lam=0.1, key=key)


def test_pure_l2_term_has_smoothness_lambda():
  # With w = 0 the attention term is constant, so the Hessian is λI.
  mask, _, x = random_problem(40, n=5, d=4)
  got = smoothness_measured(mask, np.zeros((4, 4)), x, lam=0.7, key=jax.random.key(0), iters=5)
  np.testing.assert_allclose(got, 0.7, rtol=1e-6)  # float32 rounding of λ and of the norms



@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smoothness_bound_is_above_the_dense_hessian_norm(causal, seed):
  mask, w, x = random_problem(60 + seed, n=5, d=3, batch=2, scale=3.0)
  loss = functools.partial(ap.pruning_loss, w=w, x=x, lam=0.1, causal=causal)
  dense_hessian = jax.jit(jax.hessian(loss))
  for point in (mask, np.ones_like(mask), np.zeros_like(mask)):
    hessian = dense_hessian(point).reshape(9, 9)
    assert theory.smoothness_bound(w, x, lam=0.1) >= np.abs(np.linalg.eigvalsh(hessian)).max()


def test_bounds_on_hand_worked_cases():
  # X = I (n = d = 2), one sequence, W with max |W_ij| = 2: a = ‖W‖_max ‖X‖₂² = 2.
  x, w = np.eye(2), np.array([[2.0, -1.0], [0.5, 0.0]])
  assert theory.smoothness_bound(w, x, lam=0.3) == pytest.approx(0.3 + 11 / 4 * 4)
  assert theory.gradient_bound(w, x) == pytest.approx(np.sqrt(2) / 2 * np.sqrt(2) * 2)
  assert theory.attention_term_max(np.zeros((3, 5, 2)), causal=True) == 12
  assert theory.attention_term_max(np.zeros((3, 5, 2)), causal=False) == 15
  # W = 0: the attention term is constant, the bound is exactly λ and B = 0.
  assert theory.smoothness_bound(np.zeros((2, 2)), x, lam=0.7) == pytest.approx(0.7)
  pl = theory.pl_constants(np.zeros((2, 2)), x, lam=0.5, causal=False)
  assert pl == (0.25, 2.0, 2.0, 0.0)
  assert theory.predicted_rate(0.1, 0.2) == pytest.approx(0.99)


@pytest.mark.parametrize("causal", [True, False])
def test_gradient_bound_and_pl_inequality_hold_at_random_masks(causal):
  _, w, x = random_problem(70, n=6, d=4, batch=2, scale=3.0)
  lam = 0.05
  pl = theory.pl_constants(w, x, lam=lam, causal=causal)
  rng = np.random.default_rng(0)
  for _ in range(20):
    mask = rng.normal(scale=3.0, size=(4, 4))
    grad = np.asarray(ap.pruning_grad(mask, w, x, lam=lam, causal=causal))
    loss = float(ap.pruning_loss(mask, w, x, lam=lam, causal=causal))
    assert np.linalg.norm(grad - lam * mask) <= pl.gradient_bound
    assert 0.5 * np.sum(grad**2) >= pl.mu * (loss - pl.xi)
    assert loss - 0.5 * lam * np.sum(mask**2) <= pl.attention_term_max


def test_softmax_row_constants_bound_autodiff():
  rng = np.random.default_rng(1)
  h = lambda s, t: 0.5 * jnp.sum((jax.nn.softmax(s) - t)**2)
  gradient, hessian = jax.jit(jax.grad(h)), jax.jit(jax.hessian(h))
  for _ in range(30):
    s, t = rng.normal(scale=4.0, size=6), rng.dirichlet(np.ones(6))
    assert np.linalg.norm(gradient(s, t)) <= theory.SOFTMAX_ROW_GRADIENT
    assert np.abs(np.linalg.eigvalsh(hessian(s, t))).max() <= theory.SOFTMAX_ROW_CURVATURE


def test_measured_rate_recovers_a_geometric_sequence():
  steps = np.arange(300)
  assert theory.measured_rate(5.0 + 2.0 * 0.97**steps) == pytest.approx(0.97, rel=1e-9)
  assert np.isnan(theory.measured_rate(np.full(50, 3.0)))
  with pytest.raises(ValueError, match="loss must be a 1-d history"):
    theory.measured_rate([1.0, 0.5])


def test_pl_xi_needed_is_the_tightest_offset():
  loss, grad_norm = np.array([4.0, 3.0, 2.5]), np.array([2.0, 1.0, 0.0])
  xi = theory.pl_xi_needed(loss, grad_norm, mu=0.5)
  assert xi == pytest.approx(2.5)
  assert np.all(0.5 * grad_norm**2 >= 0.5 * (loss - xi) - 1e-12)
