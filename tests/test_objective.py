"""pruning_loss and the closed-form pruning_grad: numpy reference, autodiff, finite differences
(in float64), float32 against float64."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import attnprune_jax as ap
from attnprune_jax import objective
from attnprune_jax.attention import softmax_attention
from conftest import random_problem
import reference_numpy

CASES = [(causal, batch) for causal in (True, False) for batch in (None, 3)]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("causal,batch", CASES)
def test_loss_matches_numpy_reference(causal, batch):
  mask, w, x = random_problem(10, batch=batch, scale=2.0, dtype=np.float64)
  got = ap.pruning_loss(mask, w, x, lam=0.07, causal=causal)
  want = reference_numpy.pruning_loss(mask, w, x, 0.07, causal)
  np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("causal,batch", CASES)
def test_closed_form_gradient_matches_autodiff(causal, batch):
  mask, w, x = random_problem(11, batch=batch, scale=2.0, dtype=np.float64)
  loss = functools.partial(ap.pruning_loss, w=w, x=x, lam=0.05, causal=causal)
  np.testing.assert_allclose(ap.pruning_grad(mask, w, x, lam=0.05, causal=causal),
                             jax.grad(loss)(mask), rtol=1e-10, atol=1e-14)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("causal,batch", CASES)
def test_closed_form_gradient_matches_finite_differences(causal, batch):
  mask, w, x = random_problem(12, batch=batch, scale=2.0, dtype=np.float64)
  lam, step = 0.05, 1e-6
  grad = np.asarray(ap.pruning_grad(mask, w, x, lam=lam, causal=causal))
  rng = np.random.default_rng(0)
  for i, j in rng.integers(0, mask.shape[0], size=(8, 2)):
    bump = np.zeros_like(mask)
    bump[i, j] = step
    plus = reference_numpy.pruning_loss(mask + bump, w, x, lam, causal)
    minus = reference_numpy.pruning_loss(mask - bump, w, x, lam, causal)
    np.testing.assert_allclose(grad[i, j], (plus - minus) / (2 * step), rtol=1e-6, atol=1e-9)


@pytest.mark.usefixtures("x64")
def test_directional_derivative_matches_finite_differences():
  mask, w, x = random_problem(13, batch=2, scale=2.0, dtype=np.float64)
  direction = np.random.default_rng(1).normal(size=mask.shape)
  step = 1e-6
  grad = ap.pruning_grad(mask, w, x, lam=0.1)
  plus = reference_numpy.pruning_loss(mask + step * direction, w, x, 0.1, True)
  minus = reference_numpy.pruning_loss(mask - step * direction, w, x, 0.1, True)
  np.testing.assert_allclose(np.vdot(grad, direction), (plus - minus) / (2 * step), rtol=1e-7)


def test_gradient_at_all_ones_is_only_the_l2_term():
  # At M = 1 the pruned attention equals the dense one, so the attention term is stationary.
  # float32: the attention term's gradient is zero up to rounding (|∇| ~ 0.3), the loss is a sum
  # of 25 float32 terms.
  _, w, x = random_problem(14, batch=2, scale=2.0)
  ones = np.ones_like(w)
  np.testing.assert_allclose(ap.pruning_grad(ones, w, x, lam=0.3), 0.3 * ones, atol=1e-6)
  np.testing.assert_allclose(ap.pruning_loss(ones, w, x, lam=0.3), 0.15 * w.size, rtol=1e-6)


def test_loss_and_gradient_sum_over_sequences():
  mask, w, x = random_problem(15, batch=3, scale=2.0)
  lam, b = 0.2, 3
  l2_loss, l2_grad = 0.5 * lam * np.sum(mask**2), lam * mask
  losses = [ap.pruning_loss(mask, w, x[i], lam=lam) for i in range(b)]
  grads = [ap.pruning_grad(mask, w, x[i], lam=lam) for i in range(b)]
  # float32: the batched and the per-sequence sums round differently (entries of order 0.1-1).
  np.testing.assert_allclose(ap.pruning_loss(mask, w, x, lam=lam),
                             sum(losses) - (b - 1) * l2_loss, rtol=1e-5)
  np.testing.assert_allclose(ap.pruning_grad(mask, w, x, lam=lam),
                             sum(grads) - (b - 1) * l2_grad, rtol=1e-5, atol=1e-6)


def test_attention_error_is_twice_the_attention_term():
  mask, w, x = random_problem(16, batch=2, scale=2.0)
  np.testing.assert_allclose(ap.attention_error(mask, w, x),
                             2 * ap.pruning_loss(mask, w, x, lam=0.0), rtol=1e-6)
  # 0 up to rounding: compiled as one program, XLA may sum the two score matmuls in different
  # orders (seen: 1.5e-16 against entries of order 1).
  assert abs(float(ap.attention_error(np.ones_like(w), w, x))) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
def test_huge_logits_give_float32_loss_and_gradient_close_to_float64(causal):
  mask, w, x = random_problem(17, n=16, d=8, batch=2)
  x = x * 40
  assert np.abs(np.einsum("bnd,de,bme->bnm", x, w, x)).max() > 1e4
  loss = ap.pruning_loss(mask, w, x, lam=0.01, causal=causal)
  grad = ap.pruning_grad(mask, w, x, lam=0.01, causal=causal)
  assert loss.dtype == jnp.float32 and grad.dtype == jnp.float32
  assert np.isfinite(loss) and np.isfinite(grad).all()
  with jax.enable_x64(True):
    mask64, w64, x64 = (a.astype(np.float64) for a in (mask, w, x))
    want_loss = ap.pruning_loss(mask64, w64, x64, lam=0.01, causal=causal)
    want_grad = ap.pruning_grad(mask64, w64, x64, lam=0.01, causal=causal)
  # Saturated rows are one-hot in both precisions: the loss agrees to float32 rounding and the
  # gradient (≈ λM, entries ~0.01) to 1e-6 absolute.
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("causal,batch", CASES)
def test_float32_loss_and_gradient_match_float64(seed, causal, batch):
  # The closed form on float32 inputs against float64 autodiff of the loss on the same inputs.
  # Over 72 such problems (n up to 32, |logits| up to ~10) the float32 error was at most 1.4e-6
  # of the gradient's largest entry and 4e-7 of the loss: 1e-5 leaves a 7-fold margin, while a
  # float32 cancellation (errors ~1e-3) would fail.
  mask, w, x = random_problem(100 + seed, n=12, d=6, batch=batch, scale=2.0)
  loss = ap.pruning_loss(mask, w, x, lam=0.05, causal=causal)
  grad = ap.pruning_grad(mask, w, x, lam=0.05, causal=causal)
  with jax.enable_x64(True):
    mask64, w64, x64 = (a.astype(np.float64) for a in (mask, w, x))
    want_loss = ap.pruning_loss(mask64, w64, x64, lam=0.05, causal=causal)
    want_grad = jax.grad(functools.partial(ap.pruning_loss, w=w64, x=x64, lam=0.05,
                                           causal=causal))(mask64)
  assert loss.dtype == grad.dtype == jnp.float32 and want_grad.dtype == jnp.float64
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-5 * np.abs(want_grad).max())


def test_jit_agrees_with_eager():
  mask, w, x = random_problem(18, batch=2, scale=2.0)
  for fn in (ap.pruning_loss, ap.pruning_grad):
    jitted = jax.jit(fn, static_argnames="causal")
    # float32: XLA fuses the jitted function differently, a few ulps apart (entries ~0.1).
    np.testing.assert_allclose(jitted(mask, w, x, lam=0.1), fn(mask, w, x, lam=0.1), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.usefixtures("x64")
def test_dtypes_are_preserved():
  # With float64 available, float32 inputs must still not be promoted to it.
  mask, w, x = random_problem(19, batch=2)
  assert ap.pruning_loss(mask, w, x, lam=0.1).dtype == jnp.float32
  assert ap.pruning_grad(mask, w, x, lam=0.1).dtype == jnp.float32
  assert ap.attention_error(mask, w, x).dtype == jnp.float32


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("causal,n,block", [(True, 10, 4), (False, 12, 4), (True, 7, 16),
                                             (False, 9, 1)])  # padded rows, one block, 1 row
def test_row_blocked_loss_and_gradient_equal_the_dense_ones(causal, n, block):
  mask, w, x = random_problem(40 + n, n=n, d=5, batch=2, scale=2.0, dtype=np.float64)
  got_loss, got_grad = jax.jit(objective.blocked_loss_and_grad,
                               static_argnames=("causal", "block"))(
      mask, w, x, 0.07, causal=causal, block=block)
  np.testing.assert_allclose(got_loss, reference_numpy.pruning_loss(mask, w, x, 0.07, causal),
                             rtol=1e-12)
  np.testing.assert_allclose(got_grad, ap.pruning_grad(mask, w, x, lam=0.07, causal=causal),
                             rtol=1e-10, atol=1e-13)


def test_row_blocked_step_needs_far_less_memory_than_one_attention_matrix():
  b, n, d = 2, 2048, 64
  x, w = jax.ShapeDtypeStruct((b, n, d), jnp.float32), jax.ShapeDtypeStruct((d, d), jnp.float32)

  def temp_bytes(loss_and_grad):
    return jax.jit(loss_and_grad).lower(w, w, x).compile().memory_analysis().temp_size_in_bytes

  blocked = temp_bytes(lambda m, w, x: objective.blocked_loss_and_grad(m, w, x, 0.1, True, 128))
  dense = temp_bytes(lambda m, w, x: objective.merged_loss_and_grad(
      m, w, x, ap.attention.softmax_attention(x, w, causal=True), 0.1, True))
  attention_matrix = b * n * n * 4
  assert dense >= 2 * attention_matrix  # f(M∘W) and f(W) at least
  assert blocked < attention_matrix / 2, (blocked, attention_matrix)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [None, 4])
def test_bfloat16_compute_rounds_the_matmul_operands_and_nothing_else(causal, block):
  mask, w, x = random_problem(3, n=10, d=6, batch=2, scale=2.0)
  lam = 0.07
  # Independent reference in float64 numpy, each matmul operand rounded to bfloat16.
  bf16 = lambda a: np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
  allowed = np.tril(np.ones((10, 10), bool)) | (not causal)

  def attention(v):
    scores = np.einsum("bne,bme->bnm", bf16(np.einsum("bnd,de->bne", bf16(x), bf16(v))), bf16(x))
    scores = np.where(allowed, scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  f = attention(mask * w)
  gap = f - attention(w)
  g = f * (gap - (gap * f).sum(-1, keepdims=True))
  expected_grad = w * np.einsum("bnd,bne->de", bf16(x),
                                bf16(np.einsum("bnm,bme->bne", bf16(g), bf16(x)))) + lam * mask
  expected_loss = 0.5 * np.sum(gap**2) + 0.5 * lam * np.sum(mask**2)
  x_bf16 = jnp.asarray(x, jnp.bfloat16)
  if block is None:
    target = softmax_attention(x_bf16, w, causal=causal, compute_dtype=jnp.bfloat16)
    loss, grad = objective.merged_loss_and_grad(mask, w, x_bf16, target, lam, causal,
                                                jnp.bfloat16)
  else:
    loss, grad = objective.blocked_loss_and_grad(mask, w, x_bf16, lam, causal, block,
                                                 jnp.bfloat16)
  assert loss.dtype == grad.dtype == jnp.float32
  scale = np.abs(expected_grad).max()
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-5 * scale)
  # The float32 gradient is farther away by orders of magnitude: bfloat16 was really used.
  float32_grad = ap.pruning_grad(mask, w, x, lam=lam, causal=causal)
  assert np.abs(float32_grad - expected_grad).max() > 1e-3 * scale
