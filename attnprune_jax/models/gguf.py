"""Read a Llama-architecture GGUF file into a `LlamaConfig`, float32 weights and a tokenizer.

Tensors are dequantized with `gguf.quants.dequantize` and come out in (out, in) order. GGUF
stores q/k rows permuted inside each head for interleaved RoPE (llama.cpp's converter); they are
un-permuted here to the Hugging Face order, which `models.llama` pairs with rotate-half RoPE.
Mixing the two conventions does not crash: it gives a perplexity of ~130 instead of ~30.
"""

import os

import gguf
import numpy as np

from attnprune_jax.errors import InputError, MissingFileError
from attnprune_jax.models.llama import LlamaConfig
from attnprune_jax.models.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "q_proj", "attn_k": "k_proj",
    "attn_v": "v_proj", "attn_output": "o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """GGUF's interleaved-RoPE row order of q/k (heads·hd, in) back to the Hugging Face order."""
  rows, cols = w.shape
  return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field(reader: gguf.GGUFReader, key: str, path, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is not None:
      return default
    raise InputError(f"model file {path} lacks the GGUF field {key!r}")
  return field.contents()


def _dequantize(tensor, path) -> np.ndarray:
  try:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except (NotImplementedError, ValueError, KeyError) as err:
    raise InputError(f"model file {path}: tensor {tensor.name} has quantization "
                     f"{tensor.tensor_type.name}, which cannot be dequantized ({err})") from err
  shape = tuple(int(n) for n in reversed(tensor.shape))
  return np.asarray(values, np.float32).reshape(shape)


def read_gguf(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer]:
  """Config, float32 weights (layer weights stacked, (layers, out, in)) and tokenizer of a file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingFileError(f"model file {path} does not exist")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as err:  # gguf raises ValueError, struct errors, etc. on corrupt files
    raise InputError(f"model file {path} is not a readable GGUF file: {err}") from err
  arch = _field(reader, "general.architecture", path)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise InputError(f"model file {path} has architecture {arch!r}; supported: "
                     f"{SUPPORTED_ARCHITECTURES}")
  if f"{arch}.rope.scaling.type" in reader.fields:
    raise InputError(f"model file {path} uses RoPE scaling, which is not supported")
  heads = int(_field(reader, f"{arch}.attention.head_count", path))
  hidden = int(_field(reader, f"{arch}.embedding_length", path))
  head_dim = int(_field(reader, f"{arch}.attention.key_length", path, default=hidden // heads))
  rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", path, default=head_dim))
  if rope_dims != head_dim:
    raise InputError(f"model file {path} rotates {rope_dims} of {head_dim} head dimensions; "
                     "only full RoPE is supported")
  tokens = list(_field(reader, "tokenizer.ggml.tokens", path))
  layers = int(_field(reader, f"{arch}.block_count", path))
  names = {t.name for t in reader.tensors}
  config = LlamaConfig(
      vocab_size=len(tokens), hidden_size=hidden,
      intermediate_size=int(_field(reader, f"{arch}.feed_forward_length", path)),
      num_layers=layers, num_heads=heads,
      num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", path, default=heads)),
      head_dim=head_dim,
      rope_base=float(_field(reader, f"{arch}.rope.freq_base", path, default=10000.0)),
      rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
      tie_embeddings="output.weight" not in names)

  per_layer: dict[str, list] = {name: [None] * layers for name in _LAYER_TENSORS.values()}
  weights: dict[str, np.ndarray] = {}
  for tensor in reader.tensors:
    stem, _, suffix = tensor.name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_TENSORS and suffix == "weight":
      name = _LAYER_TENSORS[parts[2]]
      value = _dequantize(tensor, path)
      if name == "q_proj":
        value = unpermute_rows(value, config.num_heads)
      elif name == "k_proj":
        value = unpermute_rows(value, config.num_kv_heads)
      per_layer[name][int(parts[1])] = value
    elif stem in _GLOBAL_TENSORS and suffix == "weight":
      weights[_GLOBAL_TENSORS[stem]] = _dequantize(tensor, path)
  for name, values in per_layer.items():
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
      raise InputError(f"model file {path} lacks {name} of layers {missing}")
    weights[name] = np.stack(values)
  shapes = config.weight_shapes()
  for name, shape in shapes.items():
    if name not in weights:
      raise InputError(f"model file {path} lacks the tensor for {name}")
    if weights[name].shape != shape:
      raise InputError(f"model file {path}: {name} has shape {weights[name].shape}, "
                       f"expected {shape}")
  tokenizer = Tokenizer(tokens, list(_field(reader, "tokenizer.ggml.merges", path)),
                        [int(t) for t in _field(reader, "tokenizer.ggml.token_type", path)])
  return config, {name: weights[name] for name in shapes}, tokenizer
