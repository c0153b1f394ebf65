"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with weight updates, column by column.

With H = (2/N) Σ_t x_t x_tᵀ (damped by `percdamp`·mean(diag H)) and U the upper Cholesky factor
of H⁻¹ (H⁻¹ = UᵀU), columns are swept in blocks. At the start of each block the mask is chosen
jointly over rows × block by the saliency w² / U_qq² of the current, already updated, weights
(for N:M: at every m-th column, per row, among the next m columns). Then, column q by column q,
the pruned entries are zeroed and the error (w − w_pruned) / U_qq is pushed onto the later
columns of the block through U[q, q:]; after the block, onto all later columns at once (the lazy
batch update). Inputs that never fire (H_jj = 0) get H_jj = 1 and their weight column zeroed.

Deviation from the reference code (documented in paper_repro.md): a block prunes exactly
rows·count − round_half_up((1 − s)·rows·count) entries, ties pruning the higher index, where the
reference prunes every entry at or below the value of rank int(s·rows·count) (one more, or
more with ties).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from attnprune_jax import validation
from attnprune_jax.baselines.calibration import InputStats, as_stats
from attnprune_jax.errors import InputError
from attnprune_jax.masks import binarize
from attnprune_jax.patterns import check_n_m

MAX_DAMPING_RETRIES = 6


@jax.jit
def _upper_inverse_factor(hessian: Float[Array, "in in"], damping) -> Float[Array, "in in"]:
  """U upper triangular with (H + damping·I)⁻¹ = UᵀU; NaN where the Cholesky fails."""
  eye = jnp.eye(hessian.shape[0], dtype=hessian.dtype)
  lower = jnp.linalg.cholesky(hessian + damping * eye)
  inverse = jax.scipy.linalg.cho_solve((lower, True), eye)
  return jnp.linalg.cholesky(0.5 * (inverse + inverse.T)).T


def inverse_hessian_factor(hessian, percdamp: float) -> tuple[jax.Array, float]:
  """The upper Cholesky factor of the damped H⁻¹, and the relative damping that worked.

  A failed factorization is retried with ten times the damping (at least 1e-4), with a warning.
  """
  mean_diagonal = jnp.mean(jnp.diagonal(hessian))
  relative = percdamp
  for _ in range(MAX_DAMPING_RETRIES + 1):
    factor = _upper_inverse_factor(hessian, relative * mean_diagonal)
    if validation.is_traced(factor) or bool(jnp.isfinite(factor).all()):
      return factor, relative
    raised = max(10.0 * relative, 1e-4)
    warnings.warn(f"sparsegpt: Cholesky of the Hessian failed with damping "
                  f"{relative:g}·mean(diag H); retrying with {raised:g}", RuntimeWarning,
                  stacklevel=3)
    relative = raised
  raise InputError(f"sparsegpt: the Hessian is not positive definite even with damping "
                   f"{relative:g}·mean(diag H); check the calibration inputs x")


def _prune_block(w1, u1, sparsity: float, n_m):
  """Prunes one block of columns w1 (rows, count) given its factor block u1 (count, count).

  Returns the pruned-and-updated block, the scaled errors (rows, count), and the mask.
  """
  count = w1.shape[1]
  diagonal = jnp.diagonal(u1)

  def eliminate(i, carry):
    w1, errors, keep = carry
    column = w1[:, i]
    pruned = jnp.where(keep[:, i], column, 0)
    error = (column - pruned) / diagonal[i]
    # u1 is upper triangular: columns before i are left alone, column i becomes `pruned`.
    w1 = (w1 - jnp.outer(error, u1[i])).at[:, i].set(pruned)
    return w1, errors.at[:, i].set(error), keep

  errors = jnp.zeros_like(w1)
  if n_m is None:
    keep = binarize(w1**2 / diagonal**2, sparsity, group="matrix")
    return jax.lax.fori_loop(0, count, eliminate, (w1, errors, keep))

  n, m = n_m

  def prune_group(g, carry):
    w1, errors, keep = carry
    columns = jax.lax.dynamic_slice_in_dim(w1, g * m, m, axis=1)
    scale = jax.lax.dynamic_slice_in_dim(diagonal, g * m, m)
    group_keep = binarize(columns**2 / scale**2, n / m, n_m=(n, m))
    keep = jax.lax.dynamic_update_slice_in_dim(keep, group_keep, g * m, axis=1)
    return jax.lax.fori_loop(g * m, g * m + m, eliminate, (w1, errors, keep))

  keep = jnp.ones(w1.shape, bool)
  return jax.lax.fori_loop(0, count // m, prune_group, (w1, errors, keep))


@functools.partial(jax.jit, static_argnames=("sparsity", "n_m", "blocksize"))
def _sweep(w, factor, *, sparsity, n_m, blocksize):
  cols = w.shape[1]
  keep = jnp.ones(w.shape, bool)
  for start in range(0, cols, blocksize):
    stop = min(start + blocksize, cols)
    block, errors, block_keep = _prune_block(w[:, start:stop], factor[start:stop, start:stop],
                                             sparsity, n_m)
    w = w.at[:, start:stop].set(block)
    w = w.at[:, stop:].add(-errors @ factor[start:stop, stop:])
    keep = keep.at[:, start:stop].set(block_keep)
  return w, keep


def sparsegpt(w, x, sparsity: float, *, n_m: tuple[int, int] | None = None,
              blocksize: int = 128, percdamp: float = 0.01
              ) -> tuple[Float[Array, "out in"], Bool[Array, "out in"]]:
  """SparseGPT's pruned weight and mask (True = kept).

  Args:
    w: (out, in) weight.
    x: calibration inputs (tokens, in), or their `InputStats` with a Gram matrix.
    sparsity: fraction removed, in [0, 1) (per block of rows × blocksize columns).
    n_m: (n, m) structure along the input axis; m must divide blocksize.
    blocksize: columns per block of the lazy batch update.
    percdamp: damping added to diag H, relative to mean(diag H).
  Returns:
    (new_w, keep): the updated weight with zeros where pruned (w's dtype, at least float32),
    and the mask.
  """
  w = validation.check_array("w", w, ndim=2)
  stats = as_stats(x, gram=True)
  if stats.gram.shape != (w.shape[1],) * 2:
    raise InputError(f"x must have {w.shape[1]} input features (w is {tuple(w.shape)}), "
                     f"got {stats.gram.shape[0]}")
  sparsity = validation.check_sparsity(sparsity)
  blocksize = validation.check_positive_int("blocksize", blocksize)
  validation.check_scalar("percdamp", percdamp, minimum=0.0)
  if n_m is not None:
    n_m = check_n_m(n_m, sparsity, w.shape[1])
    if blocksize % n_m[1]:
      raise InputError(f"blocksize must be a multiple of m={n_m[1]}, got {blocksize}")
  dtype = jnp.promote_types(w.dtype, jnp.float32)
  hessian = (2.0 / stats.count) * stats.gram.astype(dtype)
  dead = jnp.diagonal(hessian) == 0
  hessian = hessian + jnp.diag(dead.astype(dtype))
  w = jnp.where(dead[None, :], 0, w.astype(dtype))
  factor, _ = inverse_hessian_factor(hessian, percdamp)
  return _sweep(w, factor, sparsity=sparsity, n_m=n_m, blocksize=blocksize)


def prune(w, stats: InputStats, sparsity: float, n_m: tuple[int, int] | None):
  """The registered "sparsegpt" (`methods`): its defaults (blocks of 128, 1 % damping).
  Returns (updated w with zeros where pruned, keep)."""
  return sparsegpt(w, stats, sparsity, n_m=n_m)
