"""Agreement of a pruned model with the dense one, against the numpy forward."""

import jax
import numpy as np
import pytest

from attnprune_jax import evaluate
from attnprune_jax.errors import InputError
from attnprune_jax.models.llama import Llama
from conftest import TINY_LLAMA
from reference_numpy import llama_forward


def _log_softmax(logits):
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_kl_divergence_and_top1_agreement_match_numpy():
  model = Llama.random(TINY_LLAMA, jax.random.key(0), scale=0.5)
  rng = np.random.default_rng(0)
  windows = rng.integers(0, 64, (3, 9))
  dense = model.weights()
  changed = {"down_proj": np.asarray(dense["down_proj"]) * (rng.random((3, 16, 24)) > 0.6)}
  got = evaluate.perplexity(model, windows, weights=changed, batch_size=2, against_dense=True)
  plain = evaluate.perplexity(model, windows, weights=changed, batch_size=2)
  assert got["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)
  kl, agree = [], []
  for window in windows:
    log_p = _log_softmax(llama_forward(dense, window, TINY_LLAMA)[0][:-1])
    log_q = _log_softmax(llama_forward(dense | changed, window, TINY_LLAMA)[0][:-1])
    kl.append(np.sum(np.exp(log_p) * (log_p - log_q), -1))
    agree.append(log_p.argmax(-1) == log_q.argmax(-1))
  assert got["kl_divergence"] == pytest.approx(np.mean(kl), rel=1e-4)
  assert got["top1_agreement"] == np.mean(agree)
  assert 0 < got["top1_agreement"] < 1 and got["kl_divergence"] > 0  # the test can tell
  same = evaluate.perplexity(model, windows, against_dense=True)
  assert same["kl_divergence"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1.0
  with pytest.raises(InputError, match="windows"):
    evaluate.perplexity(model, windows + 64, against_dense=True)
