"""Wanda (Sun, Liu, Bair, Kolter 2023): score |W_ij|·‖X_j‖₂, compared within each output row."""

import jax.numpy as jnp
from jaxtyping import Array, Bool

from attnprune_jax import validation
from attnprune_jax.baselines.calibration import InputStats, as_stats
from attnprune_jax.errors import InputError
from attnprune_jax.masks import binarize


def wanda_score(w, stats: InputStats):
  """|W_ij|·‖X_j‖₂ for w (out, in), with ‖X_j‖₂² = Σ_t x_tj² from the calibration tokens; in at
  least float32 (a float16 score overflows)."""
  norms = jnp.sqrt(stats.sq_norms)
  return jnp.abs(w).astype(jnp.promote_types(w.dtype, norms.dtype)) * norms[None, :]


def wanda(w, x, sparsity: float, *, n_m: tuple[int, int] | None = None) -> Bool[Array, "out in"]:
  """Wanda's mask (True = kept): every output row keeps its top scores; no weight update.

  Args:
    w: (out, in) weight.
    x: calibration inputs (tokens, in), or their `InputStats`.
    sparsity: fraction removed per row, in [0, 1).
    n_m: (n, m): each row drops its n lowest scores in every m consecutive input columns.
  """
  w = validation.check_array("w", w, ndim=2)
  stats = as_stats(x, gram=False)
  if stats.sq_norms.shape != (w.shape[1],):
    raise InputError(f"x must have {w.shape[1]} input features (w is {tuple(w.shape)}), "
                     f"got {stats.sq_norms.shape[0]}")
  return binarize(wanda_score(w, stats), sparsity, group="row", n_m=n_m)


def prune(w, stats: InputStats, sparsity: float, n_m: tuple[int, int] | None):
  """The registered "wanda" (`methods`). Returns (w with zeros where pruned, keep)."""
  keep = wanda(w, stats, sparsity, n_m=n_m)
  return jnp.where(keep, w, 0), keep
