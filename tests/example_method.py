"""A pruning method added the way a user adds one: this file, plus one registration line
(`tests/test_methods.py`). It keeps, per output row, the largest |W_ij|·‖X_j‖² (Wanda's score
with the squared feature norm), with no weight update."""

import jax.numpy as jnp

from attnprune_jax.masks import binarize


def prune(w, stats, sparsity, n_m):
  """(w with zeros where pruned, keep) for w (out, in) from its inputs' `InputStats`."""
  keep = binarize(jnp.abs(w) * stats.sq_norms[None, :], sparsity, n_m=n_m)
  return jnp.where(keep, w, 0), keep
