"""Algorithm 1 of the paper: gradient descent on the pruning mask.

M₀ = 1 (all ones), M_{t+1} = M_t − η∇L(M_t) for t < T, with the closed-form gradient of
`objective`. Plain gradient descent is `optax.sgd(lr)`; any optax `GradientTransformation` may
replace it. The whole loop is one jitted `lax.scan`; a stack of heads (h, d, d) is solved with
`jax.vmap` against the shared calibration inputs. The dense reference attention is computed once
per head, before the loop.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
import optax

from attnprune_jax import validation
from attnprune_jax.attention import attention_scores, masked_softmax
from attnprune_jax.objective import check_problem, loss_and_grad


class MaskSolution(NamedTuple):
  """Result of `solve_mask`; for a stack of heads every field has a leading head axis.

  Attributes:
    mask: final continuous mask M_T, (d, d) or (h, d, d).
    loss: L(M_t) before the update of step t, (steps,) or (h, steps).
    grad_norm: ‖∇L(M_t)‖_F at the same iterates, (steps,) or (h, steps).
  """
  mask: Float[Array, "*h d d"]
  loss: Float[Array, "*h steps"]
  grad_norm: Float[Array, "*h steps"]


def solve_mask(w, x, *, lam, steps: int, lr=None, causal: bool = True,
               optimizer: optax.GradientTransformation | None = None) -> MaskSolution:
  """Runs Algorithm 1 from M₀ = 1 for `steps` steps.

  Args:
    w: merged weight (d, d), or a stack of heads (h, d, d) sharing x.
    x: calibration hidden states (n, d) or (b, n, d).
    lam: λ >= 0 of the L2 term.
    steps: number of gradient steps T (static: a new value compiles anew).
    lr: step size η > 0 of plain gradient descent; leave None when `optimizer` is given.
    causal: causal attention.
    optimizer: an optax transformation replacing plain gradient descent. It is a static
      argument: reuse the same object to avoid recompiling.
  Returns:
    a `MaskSolution` (mask, loss, grad_norm).
  """
  w = validation.check_array("w", w, ndim=(2, 3))
  steps = validation.check_positive_int("steps", steps)
  validation.check_scalar("lam", lam, minimum=0.0)
  if optimizer is None:
    if lr is None:
      raise ValueError("lr must be given (a positive step size) when optimizer is None")
    validation.check_scalar("lr", lr, minimum=0.0, strict=True)
  elif lr is not None:
    raise ValueError("pass either lr (plain gradient descent) or optimizer, not both; "
                     f"got lr={lr} and optimizer={optimizer!r}")
  elif not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError("optimizer must be an optax.GradientTransformation, "
                    f"got {type(optimizer).__name__}")
  head = w[0] if w.ndim == 3 else w
  _, _, x = check_problem(jnp.ones_like(head), head, x)
  lr = jnp.asarray(0.0 if lr is None else lr, dtype=w.dtype)
  return _solve(w, x, jnp.asarray(lam, dtype=w.dtype), lr, steps=steps, causal=causal,
                optimizer=optimizer)


@functools.partial(jax.jit, static_argnames=("steps", "causal", "optimizer"))
def _solve(w, x, lam, lr, *, steps, causal, optimizer):
  if optimizer is None:
    optimizer = optax.sgd(lr)
  else:
    del lr
  solve_head = functools.partial(_solve_head, x=x, lam=lam, steps=steps, causal=causal,
                                 optimizer=optimizer)
  return jax.vmap(solve_head)(w) if w.ndim == 3 else solve_head(w)


def _solve_head(w, *, x, lam, steps, causal, optimizer) -> MaskSolution:
  target = masked_softmax(attention_scores(x, w), causal=causal)

  def step(carry, _):
    mask, opt_state = carry
    loss, grad = loss_and_grad(mask, w, x, target, lam, causal)
    updates, opt_state = optimizer.update(grad, opt_state, mask)
    return (optax.apply_updates(mask, updates), opt_state), (loss, jnp.sqrt(jnp.sum(grad**2)))

  mask = jnp.ones_like(w)
  (mask, _), (loss, grad_norm) = jax.lax.scan(step, (mask, optimizer.init(mask)), length=steps)
  return MaskSolution(mask, loss, grad_norm)
