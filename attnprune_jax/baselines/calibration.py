"""Running statistics of a layer's calibration inputs, accumulated batch by batch.

A pipeline never has to hold all calibration tokens: it folds each batch into `InputStats`.
Wanda needs Σ_t x_tj² per input feature j; SparseGPT needs the Gram matrix Σ_t x_t x_tᵀ (its
Hessian is H = (2/N)·Gram). Both are sums, so the order and size of the batches does not matter.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attnprune_jax import validation
from attnprune_jax.errors import InputError, InputTypeError


class InputStats(NamedTuple):
  """Sums over calibration tokens of one layer's inputs (in = input features).

  Attributes:
    sq_norms: (in,) Σ_t x_tj², the squared norm of each input feature.
    gram: (in, in) Σ_t x_t x_tᵀ, or None when not tracked.
    count: number of tokens folded in, a 0-d integer array (so `InputStats` is a pytree of
      arrays that `jax.jit` can take).
  """
  sq_norms: Float[Array, "in"]
  gram: Float[Array, "in in"] | None
  count: Int[Array, ""]


def empty_stats(features: int, *, gram: bool = True, dtype=jnp.float32) -> InputStats:
  """Statistics of no tokens yet; `gram=False` skips the (in, in) matrix (Wanda only).

  The sums are kept in at least float32 whatever `dtype` (float16 squares overflow at 256).
  """
  features = validation.check_positive_int("features", features)
  dtype = jnp.promote_types(dtype, jnp.float32)
  return InputStats(jnp.zeros((features,), dtype),
                    jnp.zeros((features, features), dtype) if gram else None,
                    jnp.zeros((), jnp.int32))


@jax.jit
def _sums(x: Float[Array, "t in"], gram: Float[Array, "in in"] | None):
  return jnp.sum(x * x, axis=0), None if gram is None else gram + x.T @ x


def accumulate(stats: InputStats, x) -> InputStats:
  """Folds a batch of inputs x (..., tokens, in) into `stats` (leading axes are tokens)."""
  if not isinstance(stats, InputStats):
    raise InputTypeError(f"stats must be InputStats (from empty_stats or input_stats), got "
                         f"{type(stats).__name__}")
  x = validation.check_array("x", x, min_ndim=2)
  features = stats.sq_norms.shape[0]
  if x.shape[-1] != features:
    raise InputError(f"x must have shape (..., {features}), got {tuple(x.shape)}")
  tokens = x.reshape(-1, features).astype(stats.sq_norms.dtype)
  sq_norms, gram = _sums(tokens, stats.gram)
  return InputStats(stats.sq_norms + sq_norms, gram, stats.count + tokens.shape[0])


def input_stats(x, *, gram: bool = True) -> InputStats:
  """Statistics of all tokens of x (..., tokens, in) at once."""
  x = validation.check_array("x", x, min_ndim=2)
  if x.shape[-1] == 0:
    raise InputError(f"x must have at least one input feature, got shape {tuple(x.shape)}")
  return accumulate(empty_stats(x.shape[-1], gram=gram, dtype=x.dtype), x)


def as_stats(x_or_stats, *, gram: bool) -> InputStats:
  """Accepts calibration inputs (tokens, in) or ready `InputStats`; checks the Gram is there."""
  stats = x_or_stats if isinstance(x_or_stats, InputStats) else input_stats(x_or_stats, gram=gram)
  if gram and stats.gram is None:
    raise InputError("x must carry a Gram matrix: accumulate InputStats with gram=True")
  if not validation.is_traced(stats.count) and int(stats.count) <= 0:
    raise InputError("x must hold at least one calibration token, got InputStats of 0 tokens")
  return stats
