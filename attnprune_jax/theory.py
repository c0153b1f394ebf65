"""Measured constants of the convergence theory (derived here, not the paper's constants).

For now: the local smoothness constant of ∇L, measured as the spectral norm of the Hessian by
power iteration on Hessian-vector products (a jvp of the closed-form gradient). The Hessian of L
is symmetric, so power iteration converges to its eigenvalue of largest magnitude.
"""

import functools

import jax
import jax.numpy as jnp

from attnprune_jax import validation
from attnprune_jax.attention import attention_scores, masked_softmax
from attnprune_jax.objective import check_problem, loss_and_grad


def smoothness_measured(mask, w, x, *, lam, key: jax.Array, causal: bool = True,
                        iters: int = 100) -> jax.Array:
  """‖∇²L(M)‖₂ at `mask`, by `iters` power iterations from a random start drawn with `key`.

  Args:
    mask: (d, d) point at which the Hessian is taken.
    w: (d, d) merged weight.
    x: (n, d) or (b, n, d) hidden states.
    lam: λ >= 0.
    key: PRNG key for the start vector.
    causal: causal attention.
    iters: power iterations (static).
  Returns:
    scalar estimate of the largest |eigenvalue| of the Hessian at `mask` (a lower bound on the
    global smoothness constant L_s).
  """
  mask, w, x = check_problem(mask, w, x)
  validation.check_scalar("lam", lam, minimum=0.0)
  iters = validation.check_positive_int("iters", iters)
  return _power_iteration(mask, w, x, jnp.asarray(lam, mask.dtype), key, causal=causal,
                          iters=iters)


@functools.partial(jax.jit, static_argnames=("causal", "iters"))
def _power_iteration(mask, w, x, lam, key, *, causal, iters):
  target = masked_softmax(attention_scores(x, w), causal=causal)

  def hvp(v):
    grad = lambda m: loss_and_grad(m, w, x, target, lam, causal)[1]
    return jax.jvp(grad, (mask,), (v,))[1]

  def step(v, _):
    hv = hvp(v)
    return hv / jnp.maximum(jnp.linalg.norm(hv), jnp.finfo(hv.dtype).tiny), None

  start = jax.random.normal(key, mask.shape, mask.dtype)
  v, _ = jax.lax.scan(step, start / jnp.linalg.norm(start), length=iters)
  return jnp.abs(jnp.vdot(v, hvp(v)))
