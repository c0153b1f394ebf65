"""Synthetic attention problems shaped like real ones (all settings are our choice).

W = W_Q W_Kᵀ / √r is low rank (r = head dimension), as a merged query-key weight of one head is.
X has i.i.d. standard normal entries except a few outlier channels scaled up, like the massive
activations of real hidden states; those channels are what makes activation-aware scores differ
from magnitude.
"""

import jax
import jax.numpy as jnp

from attnprune_jax.errors import InputError


def synthetic_problem(key: jax.Array, *, n: int, d: int, batch: int = 4, rank: int = 16,
                      heads: int | None = None, outlier_channels: int = 4,
                      outlier_scale: float = 6.0, dtype=jnp.float32):
  """Draws a merged weight and calibration inputs.

  Args:
    key: PRNG key.
    n: tokens per sequence; d: model width; batch: sequences.
    rank: rank r of W (the head dimension).
    heads: if given, draw a stack of that many independent W sharing X.
    outlier_channels: how many channels of X are scaled by `outlier_scale`.
    dtype: floating dtype of the outputs.
  Returns:
    w: (d, d) or (heads, d, d); x: (batch, n, d).
  """
  if not 0 <= outlier_channels <= d:
    raise InputError(f"outlier_channels must be in [0, d={d}], got {outlier_channels}")
  key_q, key_k, key_x, key_c = jax.random.split(key, 4)
  lead = () if heads is None else (heads,)
  w_q = jax.random.normal(key_q, lead + (d, rank), dtype) / jnp.sqrt(d)
  w_k = jax.random.normal(key_k, lead + (d, rank), dtype) / jnp.sqrt(d)
  w = w_q @ jnp.swapaxes(w_k, -1, -2) / jnp.sqrt(rank)
  channels = jax.random.choice(key_c, d, (outlier_channels,), replace=False)
  scale = jnp.ones((d,), dtype).at[channels].set(outlier_scale)
  x = jax.random.normal(key_x, (batch, n, d), dtype) * scale
  return w, x
