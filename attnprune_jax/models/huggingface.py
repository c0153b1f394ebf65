"""Save and load a Llama as a Hugging Face-style folder, the layout `LlamaForCausalLM` reads.

Files: `config.json` (Hugging Face LlamaConfig keys), `model.safetensors` (float32 tensors under
Hugging Face names, (out, in), one per layer) and `tokenizer.json` when there is a tokenizer.
q/k rows are in the Hugging Face order on both sides (rotate-half RoPE): no permutation.

Writing is all or nothing: the files go into a hidden temporary sibling folder, are fsynced, and
the folder is renamed to `path` at the end, so a crash never leaves a partial folder at `path`.
`path` must not exist yet or be an empty folder; existing models are never overwritten.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from attnprune_jax.errors import InputError, MissingFileError, OutputExistsError
from attnprune_jax.models.llama import LAYER_WEIGHTS, LlamaConfig
from attnprune_jax.models.tokenizer import Tokenizer

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"

_GLOBAL_TENSORS = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight",
                   "lm_head": "lm_head.weight"}
_LAYER_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                  "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def tensor_name(name: str, layer: int | None = None) -> str:
  """Hugging Face name of one of our weights: model.norm.weight, or for a layer weight (give
  `layer`) e.g. model.layers.0.self_attn.q_proj.weight."""
  if layer is None:
    return _GLOBAL_TENSORS[name]
  module = f"{_LAYER_MODULES[name]}." if name in _LAYER_MODULES else ""
  return f"model.layers.{layer}.{module}{name}.weight"


def _checked_weights(weights: dict, config: LlamaConfig) -> dict[str, np.ndarray]:
  """`weights` as float32 numpy arrays; ValueError unless keys and shapes match and all finite."""
  shapes = config.weight_shapes()
  if set(weights) != set(shapes):
    raise InputError(f"weights must have the keys {sorted(shapes)}, got {sorted(weights)}")
  arrays = {}
  for name, shape in shapes.items():
    value = np.asarray(weights[name], np.float32)
    if value.shape != shape:
      raise InputError(f"weights[{name!r}] must have shape {shape}, got {value.shape}")
    if not np.isfinite(value).all():
      raise InputError(f"weights[{name!r}] contains NaN or Inf")
    arrays[name] = value
  return arrays


def write_folder(path: str | os.PathLike, config: LlamaConfig, weights: dict,
                 tokenizer: Tokenizer | None) -> None:
  """Writes config.json, model.safetensors and (unless `tokenizer` is None) tokenizer.json.

  Args:
    path: the folder to create; must not exist yet, or be empty.
    config: the architecture.
    weights: by our names, layer weights stacked (`config.weight_shapes()`); stored as float32.
    tokenizer: written as tokenizer.json, or None for none.
  """
  path = Path(path)
  arrays = _checked_weights(weights, config)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise OutputExistsError(f"path {path} already exists and is not an empty folder")
  tensors = {tensor_name(name): arrays[name] for name in arrays if name not in LAYER_WEIGHTS}
  tensors |= {tensor_name(name, layer): arrays[name][layer] for layer in range(config.num_layers)
              for name in LAYER_WEIGHTS}
  document = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
      "rope_theta": config.rope_base, "rms_norm_eps": config.rms_eps,
      "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
      "torch_dtype": "float32", "hidden_act": "silu", "rope_scaling": None,
  }
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
  try:
    (staging / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    safetensors.numpy.save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer is not None:
      (staging / TOKENIZER_FILE).write_text(tokenizer.to_json_str(), encoding="utf-8")
    for file in staging.iterdir():
      with open(file, "rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(staging, 0o755)
    os.replace(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _read_config(folder: Path) -> LlamaConfig:
  """The `LlamaConfig` of folder/config.json; absent optional keys take Hugging Face defaults."""
  where = f"folder {folder}: {CONFIG_FILE}"
  try:
    document = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise InputError(f"{where} is not valid JSON: {err}") from err
  if not isinstance(document, dict):
    raise InputError(f"{where} must hold a JSON object, got {type(document).__name__}")
  architectures, model_type = document.get("architectures"), document.get("model_type")
  if architectures != ["LlamaForCausalLM"] or model_type != "llama":
    raise InputError(f"{where} has architectures {architectures!r} and model_type "
                     f"{model_type!r}; only LlamaForCausalLM / llama is supported")
  if document.get("rope_scaling") is not None:
    raise InputError(f"{where} sets rope_scaling, which is not supported")
  rope = document.get("rope_parameters") or {}  # newer transformers: rope_theta and rope_type
  if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
    raise InputError(f"{where} sets rope_parameters {rope!r}; only rope_type 'default' (no RoPE "
                     "scaling) is supported")
  if (document.get("hidden_act", "silu") != "silu" or document.get("attention_bias")
      or document.get("mlp_bias")):
    raise InputError(f"{where} asks for a hidden_act other than silu or for biases, which are "
                     "not supported")

  def get(key, kind, default=None):
    """document[key] (or `default` if given) as `kind`, else an InputError naming the key."""
    if key not in document and default is None:
      raise InputError(f"{where} lacks {key!r}")
    value = document.get(key, default)
    if kind is bool:
      if not isinstance(value, bool):
        raise InputError(f"{where}: {key} must be true or false, got {value!r}")
      return value
    try:
      if isinstance(value, bool) or (kind is int and value != int(value)):
        raise ValueError
      return kind(value)
    except (TypeError, ValueError, OverflowError):
      raise InputError(f"{where}: {key} must be a{'n integer' if kind is int else ' number'}, "
                       f"got {value!r}") from None

  hidden, heads = get("hidden_size", int), get("num_attention_heads", int)
  fields = dict(
      vocab_size=get("vocab_size", int), hidden_size=hidden,
      intermediate_size=get("intermediate_size", int), num_layers=get("num_hidden_layers", int),
      num_heads=heads, num_kv_heads=get("num_key_value_heads", int, heads),
      head_dim=get("head_dim", int, hidden // heads if heads > 0 else 0),
      rope_base=get("rope_theta", float, rope.get("rope_theta", 10000.0)),
      rms_eps=get("rms_norm_eps", float, 1e-6),
      tie_embeddings=get("tie_word_embeddings", bool, False))
  try:
    return LlamaConfig(**fields)
  except InputError as err:
    raise InputError(f"{where}: {err} (the config's fields by our names: {fields})") from None


def read_folder(path: str | os.PathLike
                ) -> tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer | None]:
  """Config, float32 weights by our names (layer weights stacked, (layers, out, in)) and the
  tokenizer (None without tokenizer.json) of a folder written by `write_folder` or by Hugging
  Face for a Llama model. Tensors the config does not need are ignored."""
  folder = Path(path)
  for name in (CONFIG_FILE, WEIGHTS_FILE):
    if not (folder / name).is_file():
      raise MissingFileError(f"folder {folder} has no {name}")
  config = _read_config(folder)
  try:
    tensors = safetensors.numpy.load_file(folder / WEIGHTS_FILE)
  except (safetensors.SafetensorError, TypeError) as err:  # TypeError: dtypes numpy lacks
    raise InputError(f"folder {folder}: {WEIGHTS_FILE} is not readable: {err}") from err

  def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
      raise InputError(f"folder {folder}: {WEIGHTS_FILE} lacks the tensor {name!r}")
    if tensors[name].shape != shape:
      raise InputError(f"folder {folder}: tensor {name!r} has shape {tensors[name].shape}, "
                       f"expected {shape}")
    value = tensors[name].astype(np.float32)
    if not np.isfinite(value).all():
      raise InputError(f"folder {folder}: tensor {name!r} in {WEIGHTS_FILE} contains NaN or Inf")
    return value

  shapes = config.weight_shapes()
  weights = {name: tensor(tensor_name(name), shapes[name])
             for name in shapes if name not in LAYER_WEIGHTS}
  for name in LAYER_WEIGHTS:
    weights[name] = np.stack([tensor(tensor_name(name, layer), shapes[name][1:])
                              for layer in range(config.num_layers)])
  tokenizer_path = folder / TOKENIZER_FILE
  tokenizer = (Tokenizer.from_json_str(tokenizer_path.read_text(encoding="utf-8"))
               if tokenizer_path.is_file() else None)
  if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
    raise InputError(f"folder {folder}: {TOKENIZER_FILE} has {tokenizer.vocab_size} tokens, more "
                     f"than the vocab_size {config.vocab_size} of {CONFIG_FILE}")
  return config, {name: weights[name] for name in shapes}, tokenizer
