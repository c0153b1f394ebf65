"""From a score to a binary mask with an exact count of kept entries.

Layout convention (the whole project): weight matrices are (out, in) like the checkpoints, so a
"row" is an output channel (axis -2 indexes rows, axis -1 runs along a row) and N:M groups run
along the input (last) axis. Leading axes, if any, index independent matrices (e.g. heads).

Counts: a group of size g keeps `patterns.kept_count(g, s)` entries, exactly for the decimal s
the user wrote. A group must keep at least one entry. Ties are broken deterministically: among
equal scores the lower index is kept first.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Real

from attnprune_jax import validation
from attnprune_jax.errors import InputError
from attnprune_jax.patterns import check_n_m, kept_count

GROUPS = ("row", "matrix")


@functools.partial(jax.jit, static_argnames="keep")
def _keep_top(score: Real[Array, "... g"], keep: int) -> Bool[Array, "... g"]:
  """True for the `keep` largest entries along the last axis; ties keep the lower index."""
  if keep == 0:
    return jnp.zeros(score.shape, bool)
  # lax.top_k is documented to put the lower index first among equal values.
  _, kept = jax.lax.top_k(score, keep)
  return jnp.put_along_axis(jnp.zeros(score.shape, bool), kept, True, axis=-1, inplace=False)


def binarize(score, sparsity: float, *, group: str = "row",
             n_m: tuple[int, int] | None = None) -> Bool[Array, "*batch rows cols"]:
  """Keeps the highest scores: a boolean mask (True = kept) with an exact count.

  Args:
    score: (..., rows, cols) real scores, larger is more important (e.g. |W|, |M∘W|·‖X_j‖).
    sparsity: fraction s in [0, 1) of entries to remove (static under jit).
    group: "row" keeps round((1 − s)·cols) per row; "matrix" keeps round((1 − s)·rows·cols)
      per matrix (the last two axes).
    n_m: (n, m) removes the n lowest of every m consecutive entries along the last axis; then
      `sparsity` must equal n/m and `group` must be "row".
  Returns:
    bool array of score's shape.
  """
  score = validation.check_array("score", score, min_ndim=2, floating=False)
  sparsity = validation.check_sparsity(sparsity)
  if group not in GROUPS:
    raise InputError(f"group must be one of {GROUPS}, got {group!r}")
  rows, cols = score.shape[-2:]
  if n_m is not None:
    if group != "row":
      raise InputError(f"n_m groups run along rows; group must be 'row', got {group!r}")
    n, m = check_n_m(n_m, sparsity, cols)
    grouped = score.reshape(score.shape[:-1] + (cols // m, m))
    return _keep_top(grouped, m - n).reshape(score.shape)
  size = cols if group == "row" else rows * cols
  keep = kept_count(size, sparsity)
  if keep == 0 and size > 0:
    raise InputError(f"sparsity={sparsity} keeps 0 of the {size} entries of each {group}: "
                     f"a {group} must keep at least one; use a sparsity of at most "
                     f"{1 - 0.5 / size:g} or a larger group")
  if group == "row":
    return _keep_top(score, keep)
  flat = score.reshape(score.shape[:-2] + (rows * cols,))
  return _keep_top(flat, keep).reshape(score.shape)


def merged_activation_score(w, x) -> Real[Array, "d d"]:
  """|W_ij|·‖X_i‖·‖X_j‖: the merged-form analogue of Wanda's score (W acts on X from both sides).

  Args:
    w: (d, d) merged weight, or a masked one M∘W.
    x: (..., d) calibration inputs; ‖X_j‖ is the norm of feature j over all tokens.
  Returns:
    (d, d) scores in at least float32.
  """
  x = validation.at_least_float32(validation.check_array("x", x))
  norms = jnp.linalg.norm(x.reshape(-1, x.shape[-1]), axis=0)
  magnitude = jnp.abs(jnp.asarray(w))
  magnitude = magnitude.astype(jnp.promote_types(magnitude.dtype, norms.dtype))
  return magnitude * norms[:, None] * norms[None, :]
