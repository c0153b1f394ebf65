"""Constants of the convergence theory, derived here (the paper's constants are not available).

Everything below is derived in docs/theory.md; in short, with L(M) = g(M) + (λ/2)‖M‖², where
g(M) = ½ Σ_b ‖f_b(M∘W) − f_b(W)‖²_F and S_b = X_b (M∘W) X_bᵀ is linear in M:

* the map M ↦ S_b has norm at most a_b = ‖W‖_max ‖X_b‖₂²;
* one softmax row p(s) against a fixed target t has ½‖p − t‖² with gradient norm ≤ √2/2 and
  Hessian norm ≤ 1/4 + 5/2 = 11/4;
* hence the smoothness constant L_s ≤ λ + (11/4) Σ_b a_b² and ‖∇g‖_F ≤ B = √(n/2) Σ_b a_b;
* g ≤ g_max = b·(n − 1) causal, b·n otherwise (rows are probability vectors);
* Young's inequality gives the PL-type inequality ½‖∇L‖² ≥ μ(L − ξ) with μ = λ/2 and
  ξ = g_max + B²/λ; with η ≤ 1/L_s, L(M_t) − ξ ≤ (1 − ηλ/2)^t (L(M₀) − ξ).

Measured counterparts: the Hessian's spectral norm by power iteration on Hessian-vector
products (a jvp of the closed-form gradient), and rates fitted to loss histories.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnprune_jax import validation
from attnprune_jax.attention import softmax_attention
from attnprune_jax.errors import InputError
from attnprune_jax.objective import check_inputs, check_problem, merged_loss_and_grad

SOFTMAX_ROW_CURVATURE = 11 / 4  # bound on ‖∇²_s ½‖softmax(s) − t‖²‖₂ (derived here)
SOFTMAX_ROW_GRADIENT = math.sqrt(2) / 2  # bound on ‖∇_s ½‖softmax(s) − t‖²‖₂ (derived here)


class PLConstants(NamedTuple):
  """The derived PL-type inequality ½‖∇L‖² ≥ mu·(L − xi) and its ingredients."""
  mu: float
  xi: float
  attention_term_max: float  # g_max
  gradient_bound: float  # B ≥ ‖∇g‖_F


def _score_map_norms(w, x) -> np.ndarray:
  """a_b = ‖W‖_max ‖X_b‖₂², a bound on the norm of M ↦ X_b (M∘W) X_bᵀ, per sequence."""
  x = np.asarray(x, np.float64)
  return float(np.abs(np.asarray(w, np.float64)).max()) * np.linalg.norm(x, ord=2, axis=(-2, -1))**2


def smoothness_bound(w, x, *, lam) -> float:
  """Upper bound on the smoothness constant of ∇L: λ + (11/4) Σ_b ‖W‖²_max ‖X_b‖₂⁴."""
  w, x = check_inputs(w, x)
  validation.check_scalar("lam", lam, minimum=0.0)
  return float(lam) + SOFTMAX_ROW_CURVATURE * float(np.sum(_score_map_norms(w, x)**2))


def gradient_bound(w, x) -> float:
  """B ≥ ‖∇g(M)‖_F for every M: √(n/2) Σ_b ‖W‖_max ‖X_b‖₂²."""
  w, x = check_inputs(w, x)
  n = x.shape[-2]
  return SOFTMAX_ROW_GRADIENT * math.sqrt(n) * float(np.sum(_score_map_norms(w, x)))


def attention_term_max(x, *, causal: bool = True) -> float:
  """g_max ≥ ½ Σ_b ‖f_b(M∘W) − f_b(W)‖²: one per row that can differ (the first causal row
  cannot)."""
  x = validation.check_array("x", x, ndim=(2, 3))
  causal = validation.check_bool("causal", causal)
  b = 1 if x.ndim == 2 else x.shape[0]
  n = x.shape[-2]
  return float(b * (n - 1 if causal else n))


def pl_constants(w, x, *, lam, causal: bool = True) -> PLConstants:
  """μ = λ/2 and ξ = g_max + B²/λ of the derived PL-type inequality (λ > 0)."""
  validation.check_scalar("lam", lam, minimum=0.0, strict=True)
  g_max = attention_term_max(x, causal=causal)
  b_bound = gradient_bound(w, x)
  return PLConstants(float(lam) / 2, g_max + b_bound**2 / float(lam), g_max, b_bound)


def predicted_rate(lr, lam) -> float:
  """The derived contraction factor 1 − ηλ/2 of L − ξ per step (valid for η ≤ 1/L_s)."""
  validation.check_scalar("lr", lr, minimum=0.0, strict=True)
  validation.check_scalar("lam", lam, minimum=0.0)
  return 1.0 - float(lr) * float(lam) / 2


def measured_rate(loss, *, skip_fraction: float = 0.2, noise: float = 1e-11) -> float:
  """Linear rate r of a loss history, fitted over its linear phase.

  Under linear convergence L_t − L* ≈ c·r^t, and so are the decreases L_t − L_{t+1}: r is
  exp(slope) of a least-squares line through log(decrease) over the steps after the first
  `skip_fraction`, using only decreases above `noise`·|L_0| (rounding). NaN if fewer than 10
  such steps remain (nothing to fit) or the loss does not decrease there.
  """
  loss = np.asarray(loss, np.float64)
  if loss.ndim != 1 or loss.size < 3:
    raise InputError(f"loss must be a 1-d history of at least 3 steps, got shape {loss.shape}")
  decrease = loss[:-1] - loss[1:]
  steps = np.arange(decrease.size)
  usable = (steps >= int(skip_fraction * decrease.size)) & (decrease > noise * abs(loss[0]))
  if usable.sum() < 10:
    return float("nan")
  slope = np.polyfit(steps[usable], np.log(decrease[usable]), 1)[0]
  return float(np.exp(slope))


def pl_xi_needed(loss, grad_norm, *, mu: float) -> float:
  """The smallest ξ for which ½‖∇L_t‖² ≥ μ(L_t − ξ) holds at every step of a trajectory."""
  loss, grad_norm = np.asarray(loss, np.float64), np.asarray(grad_norm, np.float64)
  return float(np.max(loss - 0.5 * grad_norm**2 / mu))


def smoothness_measured(mask, w, x, *, lam, key: jax.Array, causal: bool = True,
                        iters: int = 100) -> jax.Array:
  """‖∇²L(M)‖₂ at `mask`, by `iters` power iterations from a random start drawn with `key`.

  The Hessian of L is symmetric, so power iteration converges to its eigenvalue of largest
  magnitude: a local value, and a lower bound on the global smoothness constant L_s.

  Args:
    mask: (d, d) point at which the Hessian is taken, or one per head (h, d, d).
    w: (d, d) merged weight, or a stack of heads (h, d, d) sharing x (solved with `vmap`).
    x: (n, d) or (b, n, d) hidden states.
    lam: λ >= 0.
    key: PRNG key for the start vector (the same for every head).
    causal: causal attention.
    iters: power iterations (static).
  Returns:
    estimate of the largest |eigenvalue| of the Hessian at `mask`: a scalar, or (h,) for heads.
  """
  mask, w, x = check_problem(mask, w, x, w_ndim=(2, 3))
  validation.check_scalar("lam", lam, minimum=0.0)
  iters = validation.check_positive_int("iters", iters)
  causal = validation.check_bool("causal", causal)
  return _power_iteration(mask, w, x, jnp.asarray(lam, mask.dtype), key, causal=causal,
                          iters=iters)


@functools.partial(jax.jit, static_argnames=("causal", "iters"))
def _power_iteration(mask, w, x, lam, key, *, causal, iters):
  if w.ndim == 3:
    return jax.vmap(lambda m, w: _head_power_iteration(m, w, x, lam, key, causal, iters))(mask, w)
  return _head_power_iteration(mask, w, x, lam, key, causal, iters)


def _head_power_iteration(mask, w, x, lam, key, causal, iters):
  target = softmax_attention(x, w, causal=causal)

  def hvp(v):
    grad = lambda m: merged_loss_and_grad(m, w, x, target, lam, causal)[1]
    return jax.jvp(grad, (mask,), (v,))[1]

  def step(v, _):
    hv = hvp(v)
    return hv / jnp.maximum(jnp.linalg.norm(hv), jnp.finfo(hv.dtype).tiny), None

  start = jax.random.normal(key, mask.shape, mask.dtype)
  v, _ = jax.lax.scan(step, start / jnp.linalg.norm(start), length=iters)
  return jnp.abs(jnp.vdot(v, hvp(v)))
