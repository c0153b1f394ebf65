"""Bad model inputs are refused with an `InputError` that names them: corrupted (non-finite)
tensor data in GGUF files, token ids outside the vocabulary, no windows, windows whose
log-probabilities are not finite, and text windows without a tokenizer. Also the token
cross-entropy against a plain numpy log-sum-exp."""

import dataclasses
import shutil

import gguf
import numpy as np
import pytest

from attnprune_jax import cli, data, evaluate, models
from attnprune_jax.errors import InputError
import reference_numpy
from test_llama import BYTE_TOKENS, CONFIGS, numpy_model, write_tiny_gguf

CONFIG = dataclasses.replace(CONFIGS["gqa"], num_layers=1)
WINDOWS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(3, 8)).astype(np.int32)


@pytest.mark.slow  # the default tier: a corrupted tiny GGUF (below)
def test_corrupted_tensor_data_in_the_real_gguf_is_refused(tmp_path, monkeypatch):
  path = tmp_path / "smollm2.gguf"
  shutil.copyfile(models.model_path("smollm2"), path)
  # Parsing the fields takes seconds: corrupt the copy through one reader and load with it.
  reader = gguf.GGUFReader(path, "r+")
  offset = next(t.data_offset for t in reader.tensors if t.name == "blk.0.attn_q.weight")
  reader.data[offset:offset + 4096] = 0xFF
  reader.data.flush()
  monkeypatch.setattr(gguf, "GGUFReader", lambda _: reader)
  with pytest.raises(InputError, match=rf"{path}: tensor blk\.0\.attn_q\.weight contains NaN"):
    models.load(path)


def test_corrupted_tensor_data_makes_eval_exit_with_status_2(tmp_path, capsys):
  path = tmp_path / "tiny.gguf"
  write_tiny_gguf(path, numpy_model(dataclasses.replace(CONFIG, vocab_size=len(BYTE_TOKENS) + 4)))
  tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
  with open(path, "r+b") as file:
    file.seek(tensor.data_offset)
    file.write(b"\xff" * tensor.n_bytes)
  assert cli.main(["eval", "--model", str(path), "--quiet"]) == 2
  assert "tensor blk.0.attn_q.weight contains NaN or Inf" in capsys.readouterr().err


@pytest.mark.parametrize("windows,received", [
    (np.full((1, 4), 10**6), "min 1000000 and max 1000000"),
    (np.array([[0, 3, -2]]), "min -2 and max 3"),
    (np.array([[0, 64]], np.int64), "min 0 and max 64"),
])
def test_windows_outside_the_vocabulary_are_refused(windows, received):
  with pytest.raises(InputError, match=rf"windows must be token ids in \[0, 64\), got {received}"):
    evaluate.perplexity(numpy_model(CONFIG), windows)


def test_no_windows_and_ragged_windows_are_refused():
  message = r"windows must hold at least one window, got shape \(0, 8\)"
  with pytest.raises(InputError, match=message):
    evaluate.perplexity(numpy_model(CONFIG), WINDOWS[:0])
  with pytest.raises(InputError, match=r"windows must be a rectangular \(count, ctx\) array"):
    evaluate.perplexity(numpy_model(CONFIG), [[0, 1, 2], [3, 4]])


def test_non_finite_log_probabilities_are_refused():
  model = numpy_model(CONFIG)
  q = np.array(model.weights()["q_proj"])
  q[0, 0, 0] = np.nan
  with pytest.raises(InputError, match=r"weights or windows\[0:2\] produce non-finite log-prob"):
    evaluate.perplexity(model, WINDOWS, batch_size=2, weights={"q_proj": q})


def test_a_perplexity_beyond_float64_is_an_error_not_an_overflow(monkeypatch):
  monkeypatch.setattr(evaluate, "next_token_nll", lambda weights, batch, config: np.full(
      (batch.shape[0], batch.shape[1] - 1), 800.0))
  with pytest.raises(InputError, match=r"the mean NLL is 800: perplexity exp\(800\) is beyond"):
    evaluate.perplexity(numpy_model(CONFIG), WINDOWS)


def test_next_token_nll_matches_a_numpy_log_sum_exp():
  model = numpy_model(CONFIG)
  # Logits in the hundreds: exp() of them overflows float32 unless the max is subtracted first.
  weights = model.weights() | {"norm": 100.0 * model.weights()["norm"]}
  logits = np.stack([reference_numpy.llama_forward(weights, w, CONFIG)[0][:-1] for w in WINDOWS])
  assert np.abs(logits).max() > 100
  top = logits.max(-1, keepdims=True)
  log_normalizer = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
  want = log_normalizer - np.take_along_axis(logits, WINDOWS[:, 1:, None], -1)[..., 0]
  nll = evaluate.next_token_nll(weights, WINDOWS, CONFIG)
  assert nll.shape == (3, 7) and nll.dtype == np.float32
  np.testing.assert_allclose(nll, want, rtol=0, atol=1e-5 * np.abs(logits).max())


def test_windows_of_text_need_a_tokenizer():
  with pytest.raises(InputError, match="tokenizer is None"):
    data.evaluation_windows(None, count=1, ctx=8)
  with pytest.raises(InputError, match="tokenizer is None"):
    data.text_tokens(None, data.CALIBRATION_TEXT)
