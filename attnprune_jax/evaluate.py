"""Perplexity of a causal LM on token windows.

Perplexity = exp(mean NLL) over every text token of the windows: in a window of ctx tokens the
first (the start token) is context only and the other ctx − 1 are predicted and scored.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnprune_jax import validation
from attnprune_jax.errors import InputError
from attnprune_jax.models.llama import Llama, LlamaConfig, check_token_ids, forward
from attnprune_jax.reporting import Reporter


MAX_MEAN_NLL = math.log(np.finfo(np.float64).max)  # exp of more overflows


def _nll(logits, tokens):
  return optax.losses.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), tokens[:, 1:])


@functools.partial(jax.jit, static_argnames="config")
def next_token_nll(weights: dict, tokens, config: LlamaConfig) -> jax.Array:
  """−log p(token_{i+1} | tokens_{≤i}) for each window, (b, t − 1), computed stably."""
  return _nll(forward(weights, tokens, config)[0], tokens)


@functools.partial(jax.jit, static_argnames="config")
def nll_against_dense(weights: dict, dense: dict, tokens, config: LlamaConfig):
  """Per scored position (b, t − 1): the NLL under `weights`, KL(p_dense ‖ p) of the next
  token, and whether the two models' most likely next tokens agree."""
  logits = forward(weights, tokens, config)[0]
  log_p = jax.nn.log_softmax(forward(dense, tokens, config)[0][:, :-1].astype(jnp.float32))
  log_q = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return _nll(logits, tokens), kl, jnp.argmax(log_p, axis=-1) == jnp.argmax(log_q, axis=-1)


def perplexity(model: Llama, windows, *, batch_size: int = 4, weights: dict | None = None,
               against_dense: bool = False, reporter: Reporter = Reporter(quiet=True)) -> dict:
  """exp(mean NLL) of `model` over every text token of `windows` (count, ctx).

  Args:
    model: the language model.
    windows: (count >= 1, ctx >= 2) int token ids in [0, vocab_size); a last partial batch is
      run as it is.
    batch_size: windows per forward pass.
    weights: replacements for some of the model's weights (e.g. pruned q/k), same shapes.
    against_dense: also measure how closely the model with `weights` follows the dense
      `model` on the same tokens, as llama.cpp's KL-divergence tool measures a quantized model
      against its base (one more forward pass, of the dense model).
    reporter: shows a progress bar.
  Returns:
    {"perplexity", "mean_nll", "tokens" (scored), "windows", "ctx"}; with `against_dense` also
    "kl_divergence" (mean over scored tokens of KL(p_dense ‖ p) of the next token, nats) and
    "top1_agreement" (the share of them where both models' most likely token agree).
  """
  try:
    windows = np.asarray(windows)
  except ValueError as err:  # a ragged nested list
    raise InputError(f"windows must be a rectangular (count, ctx) array: {err}") from err
  if windows.ndim != 2 or windows.shape[1] < 2 or not np.issubdtype(windows.dtype, np.integer):
    raise InputError(f"windows must be an integer array (count, ctx >= 2), got "
                     f"{windows.dtype} {windows.shape}")
  if len(windows) == 0:
    raise InputError(f"windows must hold at least one window, got shape {windows.shape}")
  check_token_ids("windows", windows, model.config.vocab_size)
  batch_size = validation.check_positive_int("batch_size", batch_size)
  current, dense = model.weights(weights), model.weights()
  total, scored, kl_total, agree = 0.0, 0, 0.0, 0
  starts = range(0, len(windows), batch_size)
  for start in reporter.progress(starts, total=len(starts), desc="perplexity"):
    batch = jnp.asarray(windows[start:start + batch_size], jnp.int32)
    if against_dense:
      nll, kl, same = nll_against_dense(current, dense, batch, model.config)
      kl_total += float(np.sum(np.asarray(kl, np.float64)))
      agree += int(np.sum(same))
    else:
      nll = next_token_nll(current, batch, model.config)
    nll = np.asarray(nll, np.float64)
    if not np.isfinite(nll).all():
      raise InputError(f"the model's weights or windows[{start}:{start + len(batch)}] produce "
                       "non-finite log-probabilities (NaN or Inf in the weights or in the "
                       "replacements passed as weights?)")
    total += nll.sum()
    scored += nll.size
  mean = float(total / scored)
  if mean > MAX_MEAN_NLL:
    raise InputError(f"the mean NLL is {mean:.4g}: perplexity exp({mean:.4g}) is beyond float64 "
                     "(the model gives the text ~0 probability; are the weights garbage?)")
  result = {"perplexity": math.exp(mean), "mean_nll": mean, "tokens": scored,
            "windows": int(len(windows)), "ctx": int(windows.shape[1])}
  if against_dense:
    result |= {"kl_divergence": kl_total / scored, "top1_agreement": agree / scored}
  return result

