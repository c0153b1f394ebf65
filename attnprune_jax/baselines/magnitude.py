"""Magnitude pruning: keep the largest |W_ij|."""

import jax.numpy as jnp
from jaxtyping import Array, Bool

from attnprune_jax import validation
from attnprune_jax.masks import binarize


def magnitude(w, sparsity: float, *, group: str = "row",
              n_m: tuple[int, int] | None = None) -> Bool[Array, "out in"]:
  """Mask (True = kept) of the largest |W| per output row or per matrix, or N:M.

  Args:
    w: (out, in) weight.
    sparsity: fraction removed, in [0, 1).
    group: "row" (per output channel) or "matrix" (the reference repositories' rule).
    n_m: (n, m) structure along the input axis.
  """
  w = validation.check_array("w", w, ndim=2)
  return binarize(jnp.abs(w), sparsity, group=group, n_m=n_m)


def prune(w, stats, sparsity: float, n_m: tuple[int, int] | None):
  """The registered "magnitude" (`methods`): per output row (our choice, Wanda's group;
  `magnitude(group="matrix")` is the reference repositories' per-matrix threshold); `stats` is
  not used. Returns (w with zeros where pruned, keep)."""
  del stats
  keep = magnitude(w, sparsity, n_m=n_m)
  return jnp.where(keep, w, 0), keep
