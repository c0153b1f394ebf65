"""Perplexity of a causal LM on token windows.

Perplexity = exp(mean NLL) over every text token of the windows: in a window of ctx tokens the
first (the start token) is context only and the other ctx − 1 are predicted and scored.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attnprune_jax import validation
from attnprune_jax.errors import InputError
from attnprune_jax.models.llama import Llama, LlamaConfig, forward
from attnprune_jax.reporting import Reporter


@functools.partial(jax.jit, static_argnames="config")
def next_token_nll(weights: dict, tokens, config: LlamaConfig) -> jax.Array:
  """−log p(token_{i+1} | tokens_{≤i}) for each window, (b, t − 1), computed stably."""
  logits, _ = forward(weights, tokens, config)
  log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


def perplexity(model: Llama, windows, *, batch_size: int = 4, weights: dict | None = None,
               reporter: Reporter = Reporter(quiet=True)) -> dict:
  """exp(mean NLL) of `model` over every text token of `windows` (count, ctx).

  Args:
    model: the language model.
    windows: (count, ctx) int token windows; a last partial batch is run as it is.
    batch_size: windows per forward pass.
    weights: replacements for some of the model's weights (e.g. pruned q/k), same shapes.
    reporter: shows a progress bar.
  Returns:
    {"perplexity", "mean_nll", "tokens" (scored), "windows", "ctx"}.
  """
  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.shape[1] < 2 or not np.issubdtype(windows.dtype, np.integer):
    raise InputError(f"windows must be an integer array (count, ctx >= 2), got "
                     f"{windows.dtype} {windows.shape}")
  batch_size = validation.check_positive_int("batch_size", batch_size)
  current = model.weights(weights)
  total, scored = 0.0, 0
  starts = range(0, len(windows), batch_size)
  for start in reporter.progress(starts, total=len(starts), desc="perplexity"):
    batch = jnp.asarray(windows[start:start + batch_size], jnp.int32)
    nll = np.asarray(next_token_nll(current, batch, model.config), np.float64)
    total += nll.sum()
    scored += nll.size
  mean = float(total / scored)
  return {"perplexity": math.exp(mean), "mean_nll": mean, "tokens": scored,
          "windows": int(len(windows)), "ctx": int(windows.shape[1])}
