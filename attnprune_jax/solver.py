"""Algorithm 1 of the paper: gradient descent on the pruning mask.

M₀ = 1 (all ones), M_{t+1} = M_t − η∇L(M_t) for t < T, with the closed-form gradient of
`objective`. `solve_mask_progressive` is our extension to binary masks: gradient-descent rounds
between prune steps on a cubic schedule. Plain gradient descent is `optax.sgd(lr)`; any optax
`GradientTransformation` may replace it. The whole loop is one jitted `lax.scan`; a stack of
heads (h, d, d) is solved with `jax.vmap` against the shared calibration inputs. The dense
reference attention is computed once per head, before the loop.
"""

import functools
from typing import NamedTuple
import warnings

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
import numpy as np
import optax

from attnprune_jax import sharding, validation
from attnprune_jax.attention import softmax_attention
from attnprune_jax.errors import DivergenceError, InputError, InputTypeError
from attnprune_jax.masks import binarize, merged_activation_score
from attnprune_jax.objective import (blocked_loss_and_grad, check_inputs, merged_loss_and_grad,
                                     merged_loss_given)

# Our choice: up to n = 1024 the dense (b, n, n) reference is small and fastest; beyond it, blocks
# of 64 query rows keep a step's memory at O(b·64·n) per head.
BLOCKED_ABOVE = 1024
DEFAULT_BLOCK = 64


def default_block(tokens: int, block: int | None = None) -> int | None:
  """Query rows per block of the row-blocked objectives for windows of `tokens`: `block` if
  given (a positive integer), else None (the dense objective) up to `BLOCKED_ABOVE` tokens and
  `DEFAULT_BLOCK` beyond."""
  if block is not None:
    return validation.check_positive_int("block", block)
  return DEFAULT_BLOCK if tokens > BLOCKED_ABOVE else None


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
               optimizer: optax.GradientTransformation | None = None,
               init=None, block: int | None = None, mesh=None,
               compute_dtype=None) -> MaskSolution:
  """Runs Algorithm 1 from M₀ = 1 (or `init`) for `steps` steps.

  Args:
    w: merged weight (d, d), or a stack of heads (h, d, d) sharing x.
    x: calibration hidden states (n, d) or (b, n, d).
    lam: λ >= 0 of the L2 term.
    steps: number of gradient steps T (static: a new value compiles anew).
    lr: step size η > 0 of plain gradient descent, or one per head (h,) for a stack of heads;
      leave None when `optimizer` is given.
    causal: causal attention.
    optimizer: an optax transformation replacing plain gradient descent. It is a static
      argument: reuse the same object to avoid recompiling.
    init: the starting mask, w's shape; None is the paper's M₀ = 1. Plain gradient descent
      keeps no state, so solving in segments continued from `init` equals one long solve.
    block: query rows per block of the row-blocked objective (`objective.blocked_loss_and_grad`,
      O(b·block·n) memory per head instead of O(b·n²), the same result to rounding); None keeps
      the dense (b, n, n) reference for n <= BLOCKED_ABOVE and uses blocks of DEFAULT_BLOCK
      rows beyond.
    mesh: a `jax.sharding.Mesh` from `sharding.problem_mesh`: heads split over its "heads"
      axis, the sequences of x over its "windows" axis (the same masks up to the rounding of
      the window sum); None runs where the inputs are.
    compute_dtype: None, "float32" or "float64" (no rounding: the working dtype, at least
      float32), or "bfloat16": x is stored and the matmuls' operands are rounded to bfloat16,
      products accumulate in float32; softmax, mask, loss and updates stay in float32
      (benchmarks/RESULTS.md measures the cost).
  Returns:
    a `MaskSolution` (mask, loss, grad_norm), in float32 for float16/bfloat16 inputs (the
    precision policy: steps of ~1e-3 vanish below half precision's resolution of 1).
  Raises:
    DivergenceError: if the loss or the mask became NaN or Inf (the step size is too large).
    A loss that ends above where it started only warns (`RuntimeWarning`).
  """
  w, x = check_inputs(w, x, w_ndim=(2, 3))
  steps = validation.check_positive_int("steps", steps)
  validation.check_scalar("lam", lam, minimum=0.0)
  causal = validation.check_bool("causal", causal)
  if optimizer is None:
    if lr is None:
      raise InputError("lr must be given (a positive step size) when optimizer is None")
    lr = _check_lr(lr, w)
  elif lr is not None:
    raise InputError("pass either lr (plain gradient descent) or optimizer, not both; "
                     f"got lr={lr} and optimizer={optimizer!r}")
  elif not isinstance(optimizer, optax.GradientTransformation):
    raise InputTypeError("optimizer must be an optax.GradientTransformation, "
                    f"got {type(optimizer).__name__}")
  if init is None:
    init = jnp.ones_like(w)
  else:
    init = validation.check_array("init", init)
    if init.shape != w.shape:
      raise InputError(f"init must have w's shape {tuple(w.shape)}, got {tuple(init.shape)}")
  block = default_block(x.shape[-2], block)
  compute_dtype = _check_compute_dtype(compute_dtype)
  if compute_dtype is not None:
    x = x.astype(compute_dtype)
  lr = jnp.asarray(0.0 if lr is None else lr, dtype=w.dtype)
  init = init.astype(w.dtype)
  if mesh is not None:
    sharding.check_mesh(mesh, heads=w.shape[0] if w.ndim == 3 else 1, windows=x.shape[0])
    heads = ("heads",) if w.ndim == 3 else ()
    w, init = sharding.place(w, mesh, *heads), sharding.place(init, mesh, *heads)
    lr = sharding.place(lr, mesh, *heads[:lr.ndim])
    x = sharding.place(x, mesh, "windows")
  solution, final = _solve(w, x, init, jnp.asarray(lam, dtype=w.dtype), lr, steps=steps,
                           causal=causal, optimizer=optimizer, block=block,
                           compute_dtype=compute_dtype)
  if mesh is not None:
    solution, final = sharding.replicate((solution, final), mesh)
  if not validation.is_traced(solution.loss):
    # The history holds the loss before each update; the last update is checked too.
    step_size = "the optimizer's step size" if optimizer is not None else _describe_lr(lr)
    check_descent(jnp.concatenate([solution.loss, final[..., None]], axis=-1),
                  (solution.mask,), step_size=step_size)
  return solution


def _check_compute_dtype(compute_dtype):
  """None, or bfloat16 (by name or dtype); float32 and float64 mean the working dtype (None)."""
  if compute_dtype is None:
    return None
  try:
    dtype = jnp.dtype(compute_dtype)
  except TypeError:
    dtype = None
  if dtype == jnp.bfloat16:
    return jnp.bfloat16
  if dtype in (jnp.float32, jnp.float64):
    return None
  raise InputError("compute_dtype must be None, 'float32', 'float64' or 'bfloat16', got "
                   f"{compute_dtype!r}")


def _check_lr(lr, w):
  """A positive finite step size, or for a stack of heads (h, d, d) one per head (h,); the
  values of a traced lr are not checked, its shape is."""
  if np.ndim(lr) == 0:
    validation.check_scalar("lr", lr, minimum=0.0, strict=True)
    return lr
  lr = validation.check_array("lr", lr, ndim=1, floating=False)
  if w.ndim != 3:
    raise InputError(f"lr must be a scalar for one head, got shape {tuple(lr.shape)}")
  if lr.shape != w.shape[:1]:
    raise InputError(f"lr must be a scalar, or one step size per head ({w.shape[0]},) for a "
                     f"stack of heads, got shape {tuple(lr.shape)} for w {tuple(w.shape)}")
  if not validation.is_traced(lr) and not bool((lr > 0).all()):
    raise InputError(f"lr must be > 0, got min {float(lr.min())}")
  return lr


@functools.partial(jax.jit, static_argnames=("steps", "causal", "optimizer", "block",
                                             "compute_dtype"))
def _solve(w, x, init, lam, lr, *, steps, causal, optimizer, block, compute_dtype=None):
  def solve_head(w, init, lr):
    return _solve_head(w, init, x=x, lam=lam, steps=steps, causal=causal,
                       optimizer=optax.sgd(lr) if optimizer is None else optimizer, block=block,
                       compute_dtype=compute_dtype)

  if w.ndim == 2:
    return solve_head(w, init, lr)
  return jax.vmap(solve_head, in_axes=(0, 0, 0 if lr.ndim else None))(w, init, lr)


def _describe_lr(lr) -> str:
  if validation.is_traced(lr):
    return "lr"
  if np.ndim(lr):
    return f"lr={float(np.min(lr)):g}..{float(np.max(lr)):g} (per head)"
  return f"lr={float(lr):g}"


def check_descent(loss, masks, *, step_size: str, runs: str = "heads") -> None:
  """Outside jit: a non-finite loss or mask is a `DivergenceError` naming `step_size`; a last
  loss above the first one is a `RuntimeWarning`.

  Args:
    loss: (..., points) loss histories, ending with the loss at the final mask; leading axes
      index independent `runs` of gradient descent.
    masks: the final masks, any arrays.
    step_size: how to name the step size in the messages, e.g. "lr=0.1".
    runs: what the leading axes of `loss` are, for the messages.
  """
  if validation.is_traced(loss):
    return
  loss = np.asarray(loss, np.float64).reshape(-1, np.shape(loss)[-1])
  finite = np.isfinite(loss)
  if not finite.all() or not all(bool(jnp.isfinite(m).all()) for m in masks):
    steps = loss.shape[-1] - 1
    first = int(np.argmin(finite.all(axis=0))) if not finite.all() else steps
    where = f"at step {first}" if first < steps else "in the last update"
    raise DivergenceError(f"the solver diverged: the loss or mask became NaN or Inf {where} "
                          f"with {step_size}; use a smaller step size")
  rise = loss[:, -1] - loss[:, 0]
  rose = rise > 1e-6 * np.abs(loss[:, 0]) + 1e-10  # above float32 rounding, even from L = 0
  if rose.any():
    worst = int(np.argmax(rise))
    which = f" in {int(rose.sum())} of {len(rose)} {runs}" if len(rose) > 1 else ""
    warnings.warn(f"the loss rose{which} (worst: from {loss[worst, 0]:.4g} to "
                  f"{loss[worst, -1]:.4g}) with {step_size}: the step size is probably above "
                  "1/L_s", RuntimeWarning, stacklevel=3)


def minimize(loss_and_grad, params, *, optimizer: optax.GradientTransformation, steps: int,
             keep=None, opt_state=None, first_step: int = 0):
  """The one solver loop: `steps` optimizer steps on a mask pytree inside `lax.scan`.

  For use inside jitted code (no checks). Gradients, and then parameters, are zeroed outside
  `keep` so pruned entries stay at 0 whatever the optimizer's state.

  Args:
    loss_and_grad: (params, step) -> (loss, grads of params' structure); `step` counts from
      `first_step` (minibatch schedules use it).
    params: the starting masks, any pytree of arrays.
    optimizer: an optax transformation.
    steps: number of steps (static).
    keep: a bool pytree like params (the support), or None for all entries.
    opt_state: the optimizer's state to continue from; None initializes it.
    first_step: the step counter of the first step.
  Returns:
    (params, opt_state, loss (steps,), grad_norm (steps,)).
  """
  if opt_state is None:
    opt_state = optimizer.init(params)

  def restrict(tree):
    return tree if keep is None else jax.tree.map(lambda k, v: jnp.where(k, v, 0), keep, tree)

  def step(carry, index):
    params, opt_state = carry
    loss, grads = loss_and_grad(params, index)
    grads = restrict(grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = restrict(optax.apply_updates(params, updates))
    return (params, opt_state), (loss, optax.tree.norm(grads))

  (params, opt_state), (loss, grad_norm) = jax.lax.scan(
      step, (params, opt_state), first_step + jnp.arange(steps))
  return params, opt_state, loss, grad_norm


def prune_progressively(loss_and_grad, params, *, optimizer: optax.GradientTransformation,
                        steps: int, schedule: tuple, prune):
  """Rounds of `minimize` on the current support, each followed by a prune step (our extension).

  For use inside jitted code. After round r, `prune(params, keep, schedule[r])` returns the new
  support (a subset of `keep`; a schedule entry of None skips pruning in that round) and pruned
  entries are set to 0. The optimizer's state carries over from round to round.

  Returns:
    (keep, params, loss (len(schedule)·steps,)).
  """
  keep = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
  opt_state, losses = optimizer.init(params), []
  for index, target in enumerate(schedule):
    params, opt_state, loss, _ = minimize(loss_and_grad, params, optimizer=optimizer, steps=steps,
                                          keep=keep, opt_state=opt_state,
                                          first_step=index * steps)
    if target is not None:
      keep = prune(params, keep, target)
      params = jax.tree.map(lambda k, p: jnp.where(k, p, 0), keep, params)
    losses.append(loss)
  return keep, params, jnp.concatenate(losses)


def _solve_head(w, mask, *, x, lam, steps, causal, optimizer, block=None,
                compute_dtype=None) -> tuple[MaskSolution, jax.Array]:
  """One head's solution and the loss at its final mask (for the descent check: the history
  holds the loss before each update)."""
  # The dense reference f(W) is computed once, or (blocked) per block of rows at every step.
  target = (softmax_attention(x, w, causal=causal, compute_dtype=compute_dtype)
            if block is None else None)

  def loss_and_grad(mask, step):
    del step
    if block is None:
      return merged_loss_and_grad(mask, w, x, target, lam, causal, compute_dtype)
    return blocked_loss_and_grad(mask, w, x, lam, causal, block, compute_dtype)

  mask, _, loss, grad_norm = minimize(loss_and_grad, mask, optimizer=optimizer, steps=steps)
  if block is None:
    final = merged_loss_given(mask, w, x, target, lam, causal, compute_dtype)
  else:
    final = loss_and_grad(mask, steps)[0]
  return MaskSolution(mask, loss, grad_norm), final


class ProgressiveSolution(NamedTuple):
  """Result of `solve_mask_progressive`.

  Attributes:
    keep: the binary mask at the target sparsity, (d, d) bool.
    mask: the continuous mask at the end, zero outside `keep` (keeping these values re-weights
      the kept weights: report that as its own method, never as a pure mask).
    loss: L(M) at every gradient step of every round, (rounds·steps_per_round,).
  """
  keep: Array
  mask: Float[Array, "d d"]
  loss: Float[Array, "steps"]


def cubic_schedule(sparsity: float, rounds: int) -> tuple[float, ...]:
  """Sparsity after each prune step r = 1..R: s·(1 − (1 − r/R)³), ending at s."""
  return tuple(sparsity * (1.0 - (1.0 - r / rounds)**3) for r in range(1, rounds + 1))


def solve_mask_progressive(w, x, *, sparsity: float, lam, lr, rounds: int = 10,
                           steps_per_round: int = 30, causal: bool = True
                           ) -> ProgressiveSolution:
  """Gradient descent on M from M₀ = 1, pruning to a cubic sparsity schedule (our extension).

  Each round runs `steps_per_round` steps of plain gradient descent with the gradient masked to
  the current support, then keeps, per row, the top entries of |M∘W|·‖X_i‖·‖X_j‖ among the
  support at the round's sparsity (entries outside the support are set to 0 and stay out).

  Args:
    w: (d, d) merged weight.
    x: (n, d) or (b, n, d) calibration inputs.
    sparsity: final fraction removed per row, in [0, 1).
    lam: λ >= 0; lr: step size > 0.
    rounds: prune steps R; steps_per_round: gradient steps before each prune step.
    causal: causal attention.
  Returns:
    a `ProgressiveSolution` (keep, mask, loss), float32 for half-precision inputs.
  Raises:
    DivergenceError: if the loss or the mask became NaN or Inf.
  """
  w, x = check_inputs(w, x)
  sparsity = validation.check_sparsity(sparsity)
  validation.check_scalar("lam", lam, minimum=0.0)
  validation.check_scalar("lr", lr, minimum=0.0, strict=True)
  rounds = validation.check_positive_int("rounds", rounds)
  steps = validation.check_positive_int("steps_per_round", steps_per_round)
  causal = validation.check_bool("causal", causal)
  solution = _solve_progressive(w, x, jnp.asarray(lam, w.dtype), jnp.asarray(lr, w.dtype),
                                schedule=cubic_schedule(sparsity, rounds), steps=steps,
                                causal=causal)
  # Scores from a NaN mask would still give a tidy `keep`: the losses and mask are checked.
  # Prune steps raise the loss; within a round it should fall.
  check_descent(solution.loss.reshape(rounds, steps), (solution.mask,),
                step_size=_describe_lr(lr), runs="rounds")
  return solution


@functools.partial(jax.jit, static_argnames=("schedule", "steps", "causal"))
def _solve_progressive(w, x, lam, lr, *, schedule, steps, causal) -> ProgressiveSolution:
  target = softmax_attention(x, w, causal=causal)
  activation = merged_activation_score(jnp.ones_like(w), x)

  def loss_and_grad(mask, step):
    del step
    return merged_loss_and_grad(mask, w, x, target, lam, causal)

  def prune(mask, keep, sparsity):
    # Scores are >= 0, so entries already pruned (score −1) are never chosen again.
    return binarize(jnp.where(keep, jnp.abs(mask * w) * activation, -1.0), sparsity)

  keep, mask, loss = prune_progressively(loss_and_grad, jnp.ones_like(w),
                                         optimizer=optax.sgd(lr), steps=steps,
                                         schedule=schedule, prune=prune)
  return ProgressiveSolution(keep, mask, loss)
