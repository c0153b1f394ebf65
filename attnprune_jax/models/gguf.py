"""Read a Llama or Gemma 3 GGUF file into a `LlamaConfig`, float32 weights and a tokenizer.

Tensor names come from gguf's own map (`gguf.get_tensor_name_map`, the one llama.cpp's converter
writes with) applied to the Hugging Face names of `models.huggingface`; a tensor it does not
name (biases, `rope_freqs`, experts) is refused, since ignoring it would change the model.
Tensors are dequantized with `gguf.quants.dequantize`, must be finite, and come out in (out, in)
order. GGUF stores q/k rows permuted inside each head for interleaved RoPE (llama.cpp's
converter); they are un-permuted here to the Hugging Face order, which `models.llama` pairs with
rotate-half RoPE. Mixing the two conventions does not crash: it gives a perplexity of ~130
instead of ~30. llama.cpp's converter permutes no Gemma rows.

Gemma 3 (architecture "gemma3"): what the file does not store is set as transformers'
`Gemma3TextConfig` and llama.cpp set it: every sixth layer (5, 11, ...) has full attention, the
others a sliding window (`attention.sliding_window`) with RoPE base 1e4; queries scaled by
1/√head_dim (1/√(d / heads) for 27B, as llama.cpp); tanh-GELU; embeddings times √d. Its norm
weights are stored as the factor 1 + w already. Soft-capped logits (Gemma 2's) or another
sliding-window pattern are refused by name.
"""

import os

import gguf
import numpy as np

from attnprune_jax.errors import InputError, MissingFileError
from attnprune_jax.models.huggingface import tensor_name
from attnprune_jax.models.llama import LAYER_WEIGHTS, LlamaConfig, layer_weight_names
from attnprune_jax.models.tokenizer import SENTENCEPIECE_MODEL, Tokenizer

# Our model families by their GGUF architecture names (the same words), with gguf's enum.
ARCHITECTURES = {gguf.MODEL_ARCH_NAMES[arch]: arch
                 for arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.GEMMA3)}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
_GLOBAL_WEIGHTS = ("embed_tokens", "norm", "lm_head")
_KEYS, _LLM, _ATTENTION, _ROPE = gguf.Keys, gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
# Gemma 3's layout where the file is silent (transformers' Gemma3TextConfig, llama.cpp).
GEMMA3_FULL_EVERY, GEMMA3_LOCAL_ROPE_BASE = 6, 10000.0


def gguf_tensor_names(num_layers: int, family: str = "llama") -> dict[tuple[str, int | None], str]:
  """(our weight name, layer or None) -> GGUF tensor name, e.g. ("q_proj", 0) ->
  "blk.0.attn_q.weight", for every weight a model of `family` may have, by gguf's own name
  map."""
  to_gguf = gguf.get_tensor_name_map(ARCHITECTURES[family], num_layers)
  keys = [(name, None) for name in _GLOBAL_WEIGHTS]
  keys += [(name, layer) for layer in range(num_layers) for name in layer_weight_names(family)]
  return {key: to_gguf.get_name(tensor_name(*key, family=family), try_suffixes=(".weight",))
          for key in keys}


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
  """The tensor as float32 (out, in); InputError if its type is unknown or a value non-finite."""
  try:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except (NotImplementedError, ValueError, KeyError) as err:
    raise InputError(f"model file {path}: tensor {tensor.name} has quantization "
                     f"{tensor.tensor_type.name}, which cannot be dequantized ({err})") from err
  shape = tuple(int(n) for n in reversed(tensor.shape))
  values = np.asarray(values, np.float32).reshape(shape)
  if not np.isfinite(values).all():
    raise InputError(f"model file {path}: tensor {tensor.name} contains NaN or Inf "
                     "(corrupted data?)")
  return values


def read_gguf(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer]:
  """Config, float32 weights (layer weights stacked, (layers, out, in)) and tokenizer of a file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingFileError(f"model file {path} does not exist")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as err:  # gguf raises ValueError, struct errors, etc. on corrupt files
    raise InputError(f"model file {path} is not a readable GGUF file: {err}") from err
  arch = _field(reader, _KEYS.General.ARCHITECTURE, path)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise InputError(f"model file {path} has architecture {arch!r}; supported: "
                     f"{SUPPORTED_ARCHITECTURES}")
  family = arch

  def field(key: str, default=None, kind=None):
    """The field's contents, converted to `kind` (int or float) if given."""
    value = _field(reader, key.format(arch=arch), path, default)
    if kind is None:
      return value
    try:
      return kind(value)
    except (TypeError, ValueError, OverflowError):
      raise InputError(f"model file {path}: field {key.format(arch=arch)} must be "
                       f"{'an integer' if kind is int else 'a number'}, got {value!r}") from None

  if _ROPE.SCALING_TYPE.format(arch=arch) in reader.fields:
    raise InputError(f"model file {path} uses RoPE scaling, which is not supported")
  heads, hidden = field(_ATTENTION.HEAD_COUNT, kind=int), field(_LLM.EMBEDDING_LENGTH, kind=int)
  head_dim = field(_ATTENTION.KEY_LENGTH, hidden // heads if heads > 0 else 0, int)
  rope_dims = field(_ROPE.DIMENSION_COUNT, head_dim, int)
  if rope_dims != head_dim:
    raise InputError(f"model file {path} rotates {rope_dims} of {head_dim} head dimensions; "
                     "only full RoPE is supported")
  value_dim = field(_ATTENTION.VALUE_LENGTH, head_dim, int)
  if value_dim != head_dim:
    raise InputError(f"model file {path} has value heads of {value_dim} dimensions and key "
                     f"heads of {head_dim}; only equal ones are supported")
  tokens = list(field(_KEYS.Tokenizer.LIST))
  token_types = [int(t) for t in field(_KEYS.Tokenizer.TOKEN_TYPE)]
  tokenizer_model, pre = field(_KEYS.Tokenizer.MODEL), reader.fields.get(_KEYS.Tokenizer.PRE)
  special = {kind: field(key, -1, int) for kind, key in (
      ("bos", _KEYS.Tokenizer.BOS_ID), ("eos", _KEYS.Tokenizer.EOS_ID),
      ("unk", _KEYS.Tokenizer.UNK_ID))}
  try:
    if family == "gemma3" and tokenizer_model == SENTENCEPIECE_MODEL:
      if not 0 <= special["unk"] < len(tokens):
        raise InputError(f"tokenizer.ggml.unknown_token_id must be a token id, got "
                         f"{special['unk']}")
      tokenizer = Tokenizer.gemma(tokens, token_types, unk_token=tokens[special["unk"]])
    elif family == "gemma3":
      raise InputError(f"tokenizer.ggml.model must be {SENTENCEPIECE_MODEL!r} for a Gemma 3 "
                       f"file, got {tokenizer_model!r}")
    else:
      tokenizer = Tokenizer(tokens, list(field(_KEYS.Tokenizer.MERGES)), token_types,
                            model=tokenizer_model, pre=None if pre is None else pre.contents())
    tokenizer = tokenizer.with_special_tokens(
        bos_token=None if special["bos"] < 0 else tokenizer.id_to_token(special["bos"]),
        eos_token=None if special["eos"] < 0 else tokenizer.id_to_token(special["eos"]),
        adds_bos=special["bos"] >= 0 and bool(field(_KEYS.Tokenizer.ADD_BOS, False)))
  except InputError as err:
    raise InputError(f"model file {path}: {err}") from err
  layers = field(_LLM.BLOCK_COUNT, kind=int)
  if layers <= 0:
    raise InputError(f"model file {path}: {_LLM.BLOCK_COUNT.format(arch=arch)} must be "
                     f"positive, got {layers}")
  names = gguf_tensor_names(layers, family)
  tensors = {tensor.name: tensor for tensor in reader.tensors}
  unused = sorted(set(tensors) - set(names.values()))
  if unused:
    raise InputError(f"model file {path} has tensors this Llama does not read (a bias, RoPE "
                     f"factors or experts would change the model): {unused[:5]}"
                     f"{' ...' if len(unused) > 5 else ''}")
  gemma = {}
  if family == "gemma3":
    gemma = _gemma3_settings(reader, path, arch, layers, heads, hidden,
                             window=field(_ATTENTION.SLIDING_WINDOW, kind=int))
  try:
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=hidden,
        intermediate_size=field(_LLM.FEED_FORWARD_LENGTH, kind=int), num_layers=layers,
        num_heads=heads, num_kv_heads=field(_ATTENTION.HEAD_COUNT_KV, heads, int),
        head_dim=head_dim, rope_base=field(_ROPE.FREQ_BASE, 10000.0, float),
        rms_eps=field(_ATTENTION.LAYERNORM_RMS_EPS, kind=float),
        tie_embeddings=names[("lm_head", None)] not in tensors,
        max_positions=field(_LLM.CONTEXT_LENGTH, -1, int) if _LLM.CONTEXT_LENGTH.format(
            arch=arch) in reader.fields else None, family=family, **gemma)
  except InputError as err:
    raise InputError(f"model file {path}: {err}") from None

  def weight(name: str, layer: int | None, shape: tuple[int, ...]) -> np.ndarray:
    gguf_name = names[(name, layer)]
    if gguf_name not in tensors:
      raise InputError(f"model file {path} lacks the tensor {gguf_name}")
    value = _dequantize(tensors[gguf_name], path)
    if value.shape != shape:
      raise InputError(f"model file {path}: tensor {gguf_name} has shape {value.shape}, "
                       f"expected {shape}")
    if name in ("q_proj", "k_proj") and family == "llama":
      value = unpermute_rows(value, heads if name == "q_proj" else config.num_kv_heads)
    return value

  weights = {}
  for name, shape in config.weight_shapes().items():
    weights[name] = (np.stack([weight(name, layer, shape[1:]) for layer in range(layers)])
                     if name in LAYER_WEIGHTS else weight(name, None, shape))
  return config, weights, tokenizer


def _gemma3_settings(reader, path, arch: str, layers: int, heads: int, hidden: int, *,
                     window: int) -> dict:
  """The `LlamaConfig` fields of a Gemma 3 file beyond the Llama's (module docstring);
  InputError naming what it has that this model does not compute."""
  for key in ("attn_logit_softcapping", "final_logit_softcapping"):
    field = reader.fields.get(f"{arch}.{key}")
    if field is not None and float(field.contents() or 0.0) != 0.0:
      raise InputError(f"model file {path} soft-caps its logits ({arch}.{key} = "
                       f"{field.contents()}), which this Gemma 3 does not compute")
  sliding = tuple(i for i in range(layers) if (i + 1) % GEMMA3_FULL_EVERY)
  pattern = reader.fields.get(_ATTENTION.SLIDING_WINDOW_PATTERN.format(arch=arch))
  if pattern is not None:  # a period (full attention every n-th layer) or a flag per layer
    value = pattern.contents()
    if isinstance(value, list):
      stated = tuple(i for i, flag in enumerate(value) if flag)
    elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
      stated = tuple(i for i in range(layers) if (i + 1) % value)
    else:
      stated = None
    if stated != sliding:
      raise InputError(f"model file {path} has the sliding-window pattern {value}; only full "
                       f"attention on every {GEMMA3_FULL_EVERY}th layer is supported")
  # llama.cpp scales Gemma 3 27B's (62 layers) queries by 1/√(d / heads), the others' by 1/√hd.
  return {"sliding_window": window,
          "sliding_layers": sliding, "local_rope_base": GEMMA3_LOCAL_ROPE_BASE,
          "query_scale": (hidden / heads) ** -0.5 if layers == 62 else None}
