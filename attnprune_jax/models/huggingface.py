"""Save and load a Llama as a Hugging Face checkpoint folder, the layout `LlamaForCausalLM` reads
(a Gemma 3 model: `Gemma3ForCausalLM`, model_type "gemma3_text", norms stored as w for 1 + w).

Reading: `config.json` (model_type "llama"; RoPE scaling of type "llama3" or none, in the old
`rope_scaling` or the newer `rope_parameters` form), `model.safetensors` or a sharded
`model.safetensors.index.json` (float32, float16 or bfloat16 tensors, each converted to float32
as it is read: the files are memory-mapped and never held whole), `tokenizer.json` with the
BOS/EOS tokens of `tokenizer_config.json` (or the ids of `config.json`). Anything this Llama does
not compute (biases, another activation, another RoPE type) is refused by name.

Writing (`write_folder`, the one writer): `config.json`, `model.safetensors` (float32, Hugging
Face names, (out, in), one tensor per layer; beyond `SHARD_BYTES`, shards and
`model.safetensors.index.json`), `tokenizer.json` and `tokenizer_config.json`. q/k
rows are in the Hugging Face order on both sides (rotate-half RoPE): no permutation. Writing is
all or nothing: the files go into a hidden temporary sibling folder, are fsynced, and the folder
is renamed to `path` at the end, so a crash never leaves a partial folder at `path`. `path` must
not exist yet or be an empty folder; existing models are never overwritten.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from attnprune_jax.attention import Llama3Scaling
from attnprune_jax.errors import InputError, MissingFileError, OutputExistsError
from attnprune_jax.models.llama import LAYER_WEIGHTS, LlamaConfig
from attnprune_jax.models.tokenizer import Tokenizer
from attnprune_jax.results import read_json, umask_mode

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
INDEX_FILE, TOKENIZER_CONFIG_FILE = "model.safetensors.index.json", "tokenizer_config.json"

_GLOBAL_TENSORS = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight",
                   "lm_head": "lm_head.weight"}
_LAYER_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                  "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
                  "q_norm": "self_attn", "k_norm": "self_attn"}
# Gemma 3's names of the norms we name by their role (see models.llama.GEMMA3_LAYER_WEIGHTS).
_GEMMA3_NORMS = {"post_attention_layernorm": "pre_feedforward_layernorm",
                 "attention_output_norm": "post_attention_layernorm",
                 "mlp_output_norm": "post_feedforward_layernorm"}


def tensor_name(name: str, layer: int | None = None, family: str = "llama") -> str:
  """Hugging Face name of one of our weights: model.norm.weight, or for a layer weight (give
  `layer`) e.g. model.layers.0.self_attn.q_proj.weight, as the model `family` names it."""
  if layer is None:
    return _GLOBAL_TENSORS[name]
  if family == "gemma3":
    name = _GEMMA3_NORMS.get(name, name)
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


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors' names of the tensor types read
SHARD_BYTES = 2**31  # write_folder starts a new file beyond this (transformers' own default: 5 GB)


def _rope_document(config: LlamaConfig) -> dict | None:
  """config.json's `rope_scaling` entry (the form Llama 3.1/3.2 checkpoints use), None if none."""
  s = config.rope_scaling
  return None if s is None else {
      "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
      "high_freq_factor": s.high_freq_factor,
      "original_max_position_embeddings": s.original_max_positions}


def _shards(tensors: dict[str, np.ndarray], limit: int) -> list[dict[str, np.ndarray]]:
  """Tensors in order, cut into consecutive groups of at most `limit` bytes (a larger tensor
  alone)."""
  groups, size = [{}], 0
  for name, value in tensors.items():
    if groups[-1] and size + value.nbytes > limit:
      groups.append({})
      size = 0
    groups[-1][name] = value
    size += value.nbytes
  return groups


def write_folder(path: str | os.PathLike, config: LlamaConfig, weights: dict,
                 tokenizer: Tokenizer | None, *, shard_bytes: int = SHARD_BYTES) -> None:
  """Writes config.json, the weights (model.safetensors, or shards of at most `shard_bytes`
  with model.safetensors.index.json) and, unless `tokenizer` is None, tokenizer.json and
  tokenizer_config.json.

  Args:
    path: the folder to create; must not exist yet, or be empty.
    config: the architecture.
    weights: by our names, layer weights stacked (`config.weight_shapes()`); stored as float32.
    tokenizer: written as tokenizer.json (+ its BOS/EOS in tokenizer_config.json), or None.
    shard_bytes: the largest weights file.
  """
  path = Path(path)
  arrays = _checked_weights(weights, config)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise OutputExistsError(f"path {path} already exists and is not an empty folder")
  arrays = _shift_norms(arrays, config, offset=-1.0)
  family = config.family
  tensors = {tensor_name(name): arrays[name] for name in arrays if name not in LAYER_WEIGHTS}
  tensors |= {tensor_name(name, layer, family): arrays[name][layer]
              for layer in range(config.num_layers) for name in config.layer_weight_names}
  document = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
      "rope_theta": config.rope_base, "rope_scaling": _rope_document(config),
      "rms_norm_eps": config.rms_eps, "vocab_size": config.vocab_size,
      "tie_word_embeddings": config.tie_embeddings, "torch_dtype": "float32",
      "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
  }
  if family == "gemma3":
    document = _gemma3_document(config, document)
  if config.max_positions is not None:
    document["max_position_embeddings"] = config.max_positions
  if tokenizer is not None:
    for kind in ("bos", "eos"):
      token = getattr(tokenizer, f"{kind}_token")
      if token is not None:
        document[f"{kind}_token_id"] = tokenizer.token_id(token)
  shards = _shards(tensors, shard_bytes)
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
  try:
    (staging / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if len(shards) == 1:
      safetensors.numpy.save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
    else:
      weight_map = {}
      for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, staging / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
      index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
               "weight_map": weight_map}
      (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
      (staging / TOKENIZER_FILE).write_text(tokenizer.to_json_str(), encoding="utf-8")
      (staging / TOKENIZER_CONFIG_FILE).write_text(json.dumps({
          "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
          "eos_token": tokenizer.eos_token, "add_bos_token": tokenizer.adds_bos,
          "model_max_length": config.max_positions}, indent=2) + "\n", encoding="utf-8")
    for file in staging.iterdir():
      with open(file, "rb") as handle:
        os.fsync(handle.fileno())
      os.chmod(file, umask_mode(0o666))  # safetensors writes 0600 whatever the umask
    os.chmod(staging, umask_mode(0o777))
    os.replace(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


# Gemma 3: how config.json spells its attention layouts, and the norms stored as w for 1 + w.
SLIDING, FULL = "sliding_attention", "full_attention"
GEMMA3_ACTIVATION = "gelu_pytorch_tanh"


def _shift_norms(arrays: dict, config: LlamaConfig, *, offset: float) -> dict:
  """`arrays` with every norm weight plus `offset` where the family stores norms as w for a
  factor 1 + w (Gemma 3: −1 to write, +1 to read); unchanged for a Llama."""
  if config.family != "gemma3":
    return arrays
  return {name: value + np.float32(offset) if name.endswith("norm") else value
          for name, value in arrays.items()}


def _gemma3_document(config: LlamaConfig, llama: dict) -> dict:
  """config.json of a Gemma 3 text model (`Gemma3ForCausalLM`) from the Llama's entries."""
  document = {key: llama[key] for key in (
      "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
      "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
      "torch_dtype", "attention_bias")}
  return document | {
      "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
      "hidden_activation": GEMMA3_ACTIVATION,
      "query_pre_attn_scalar": (config.head_dim if config.query_scale is None
                                else config.query_scale**-2),
      "sliding_window": config.sliding_window,
      "layer_types": [SLIDING if i in config.sliding_layers else FULL
                      for i in range(config.num_layers)],
      "rope_parameters": {FULL: {"rope_type": "default", "rope_theta": config.rope_base},
                          SLIDING: {"rope_type": "default", "rope_theta": config.local_rope.base}},
      "attn_logit_softcapping": None, "final_logit_softcapping": None}


def _read_json(path: Path) -> dict:
  """The JSON object in `path`; InputError naming the file otherwise."""
  try:
    document = read_json(path)
  except ValueError as err:  # malformed, not UTF-8 or nested too deeply
    raise InputError(f"{path} is not valid JSON: {err}") from err
  if not isinstance(document, dict):
    raise InputError(f"{path} must hold a JSON object, got {type(document).__name__}")
  return document


def _rope_scaling(document: dict, where: str) -> tuple[float | None, Llama3Scaling | None]:
  """(θ if the RoPE entry gives it, Llama 3.1 scaling or None) from `rope_scaling` (older
  configs) or else `rope_parameters` (newer transformers), the one transformers itself reads."""
  key = "rope_scaling" if document.get("rope_scaling") else "rope_parameters"
  entry = document.get(key)
  if not entry:
    return None, None
  if not isinstance(entry, dict):
    raise InputError(f"{where}: {key} must be an object or null, got {entry!r}")
  kind = entry.get("rope_type", entry.get("type", "default"))
  if entry.get("partial_rotary_factor", 1.0) != 1.0:
    raise InputError(f"{where}: {key} sets partial_rotary_factor to "
                     f"{entry['partial_rotary_factor']!r}; only full RoPE (1.0) is supported")
  if kind == "default":
    return entry.get("rope_theta"), None
  if kind != "llama3":
    raise InputError(f"{where}: {key} has rope_type {kind!r}; supported: 'default' (no RoPE "
                     "scaling) and 'llama3'")
  names = {"factor": "factor", "low_freq_factor": "low_freq_factor",
           "high_freq_factor": "high_freq_factor",
           "original_max_positions": "original_max_position_embeddings"}
  missing = [name for name in names.values() if name not in entry]
  if missing:
    raise InputError(f"{where}: {key} of rope_type 'llama3' lacks {missing}")
  try:
    return entry.get("rope_theta"), Llama3Scaling(**{ours: entry[theirs]
                                                     for ours, theirs in names.items()})
  except (InputError, TypeError) as err:
    raise InputError(f"{where}: {key}: {err}") from None


def _gemma3_layout(document: dict, where: str) -> tuple[float, dict]:
  """(the full layers' RoPE θ, the config's sliding-window fields) of a Gemma 3
  config.json: `layer_types` (or the older `sliding_window_pattern`, full attention every n-th
  layer), `rope_parameters` per layer type (or the older `rope_theta`, `rope_local_base_freq`),
  default RoPE only."""
  layers = document.get("num_hidden_layers")
  kinds = document.get("layer_types")
  if kinds is None:
    every = document.get("sliding_window_pattern", 6)
    if not isinstance(layers, int) or isinstance(every, bool) or not isinstance(every, int) \
        or every < 1:
      raise InputError(f"{where}: sliding_window_pattern must be a positive integer, got "
                       f"{every!r}")
    kinds = [SLIDING if (i + 1) % every else FULL for i in range(layers)]
  if not isinstance(kinds, list) or len(kinds) != layers or set(kinds) - {SLIDING, FULL}:
    raise InputError(f"{where}: layer_types must list {SLIDING!r} or {FULL!r} for each of the "
                     f"{layers} layers, got {kinds!r}")
  thetas = {FULL: document.get("rope_theta", 1e6), SLIDING: document.get("rope_local_base_freq",
                                                                         1e4)}
  parameters = document.get("rope_parameters") or {}
  if not isinstance(parameters, dict) or set(parameters) - {FULL, SLIDING}:
    raise InputError(f"{where}: rope_parameters must map {FULL!r} and {SLIDING!r} to their RoPE, "
                     f"got {parameters!r}")
  for kind in (FULL, SLIDING):
    entry = parameters.get(kind) or {}
    if not isinstance(entry, dict) or entry.get("rope_type", "default") != "default":
      raise InputError(f"{where}: rope_parameters[{kind!r}] is {entry!r}; only the default "
                       "RoPE (no scaling) is supported")
    thetas[kind] = _number(entry.get("rope_theta", thetas[kind]),
                           f"{where}: the {kind} RoPE's rope_theta")
  if document.get("rope_scaling"):
    raise InputError(f"{where}: rope_scaling {document['rope_scaling']!r} is not supported")
  sliding = tuple(i for i, kind in enumerate(kinds) if kind == SLIDING)
  return thetas[FULL], {
      "sliding_layers": sliding, "local_rope_base": thetas[SLIDING],
      "sliding_window": document.get("sliding_window") if sliding else None}


def _number(value, where: str) -> float:
  """`value` as a float; InputError naming `where` unless it is a (non-bool) number."""
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise InputError(f"{where} must be a number, got {value!r}")
  return float(value)


def _read_config(folder: Path) -> LlamaConfig:
  """The `LlamaConfig` of folder/config.json; absent optional keys take Hugging Face defaults."""
  where = f"folder {folder}: {CONFIG_FILE}"
  document = _read_json(folder / CONFIG_FILE)
  architectures, model_type = document.get("architectures"), document.get("model_type")
  gemma = model_type == "gemma3_text" and architectures in (None, ["Gemma3ForCausalLM"])
  if not gemma and (model_type != "llama" or architectures not in (None, ["LlamaForCausalLM"])):
    raise InputError(f"{where} has architectures {architectures!r} and model_type "
                     f"{model_type!r}; supported: LlamaForCausalLM / llama and "
                     "Gemma3ForCausalLM / gemma3_text")
  activation = ("hidden_activation", GEMMA3_ACTIVATION) if gemma else ("hidden_act", "silu")
  for key, supported in (activation, ("attention_bias", False), ("mlp_bias", False),
                         ("pretraining_tp", 1), ("partial_rotary_factor", 1.0),
                         ("quantization_config", None), ("attn_logit_softcapping", None),
                         ("final_logit_softcapping", None),
                         ("use_bidirectional_attention", False)):
    if document.get(key, supported) not in (supported, *((None,) if supported is False else ())):
      raise InputError(f"{where} sets {key} to {document[key]!r}; only {supported!r} is "
                       "supported")
  if gemma:
    (rope_theta, extra), scaling = _gemma3_layout(document, where), None
  else:
    (rope_theta, scaling), extra = _rope_scaling(document, where), {}

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
      if isinstance(value, bool | str) or (kind is int and value != int(value)):
        raise ValueError
      return kind(value)
    except (TypeError, ValueError, OverflowError):
      raise InputError(f"{where}: {key} must be a{'n integer' if kind is int else ' number'}, "
                       f"got {value!r}") from None

  hidden, heads = get("hidden_size", int), get("num_attention_heads", int)
  head_dim = document.get("head_dim")
  fields = dict(
      vocab_size=get("vocab_size", int), hidden_size=hidden,
      intermediate_size=get("intermediate_size", int), num_layers=get("num_hidden_layers", int),
      num_heads=heads, num_kv_heads=get("num_key_value_heads", int, heads),
      head_dim=(hidden // heads if heads > 0 else 0) if head_dim is None else
      get("head_dim", int),
      # θ inside the RoPE entry wins over the top-level one, as in transformers.
      rope_base=(get("rope_theta", float, 10000.0) if rope_theta is None else
                 _number(rope_theta, f"{where}: the RoPE entry's rope_theta")),
      rms_eps=get("rms_norm_eps", float, 1e-6),
      tie_embeddings=get("tie_word_embeddings", bool, False), rope_scaling=scaling,
      max_positions=(get("max_position_embeddings", int)
                     if document.get("max_position_embeddings") is not None else None))
  if gemma:
    scalar = get("query_pre_attn_scalar", float, 256.0)
    if not scalar > 0:
      raise InputError(f"{where}: query_pre_attn_scalar must be > 0, got {scalar!r}")
    fields |= extra | {"family": "gemma3",
                       "tie_embeddings": get("tie_word_embeddings", bool, True),
                       "query_scale": None if scalar == fields["head_dim"] else scalar**-0.5}
  try:
    return LlamaConfig(**fields)
  except InputError as err:
    raise InputError(f"{where}: {err} (the config's fields by our names: {fields})") from None


def _tensor_files(folder: Path) -> dict[str, Path] | Path:
  """Tensor name -> file from model.safetensors.index.json, or the one model.safetensors."""
  if (folder / WEIGHTS_FILE).is_file():
    return folder / WEIGHTS_FILE
  if not (folder / INDEX_FILE).is_file():
    raise MissingFileError(f"folder {folder} has no {WEIGHTS_FILE} and no {INDEX_FILE}")
  weight_map = _read_json(folder / INDEX_FILE).get("weight_map")
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise InputError(f"{folder / INDEX_FILE} has no weight_map of tensor names to files")
  for file in set(weight_map.values()):
    if not file or Path(file).name != file or file in (".", ".."):
      raise InputError(f"{folder / INDEX_FILE} names the shard {file!r}; shards must be files "
                       "of the folder itself, named without a path")
  files = {name: folder / file for name, file in weight_map.items()}
  for file in sorted(set(files.values())):
    if not file.is_file():
      raise MissingFileError(f"folder {folder}: {file.name}, named in {INDEX_FILE}, is missing")
  return files


def _special_tokens(folder: Path, tokenizer: Tokenizer) -> Tokenizer:
  """The tokenizer with the checkpoint's BOS/EOS: tokenizer_config.json's bos_token/eos_token,
  else config.json's bos_token_id/eos_token_id (the first of a list); whether BOS is added:
  tokenizer_config.json's add_bos_token, else whether tokenizer.json's post-processor adds it."""
  settings = {}
  if (folder / TOKENIZER_CONFIG_FILE).is_file():
    settings = _read_json(folder / TOKENIZER_CONFIG_FILE)
  config = _read_json(folder / CONFIG_FILE)
  tokens = {}
  for kind in ("bos", "eos"):
    where, token = f"{TOKENIZER_CONFIG_FILE}: {kind}_token", settings.get(f"{kind}_token")
    if isinstance(token, dict):  # an AddedToken written out
      token = token.get("content")
    if token is None:
      where, index = f"{CONFIG_FILE}: {kind}_token_id", config.get(f"{kind}_token_id")
      if isinstance(index, list):
        index = index[0] if index else None
      try:
        token = None if index is None else tokenizer.id_to_token(index)
      except InputError as err:
        raise InputError(f"folder {folder}: {where}: {err}") from None
    if token is not None and (not isinstance(token, str) or not tokenizer.has_token(token)):
      raise InputError(f"folder {folder}: {where} must be a token of {TOKENIZER_FILE}, got "
                       f"{token!r}")
    tokens[kind] = token
  adds_bos = settings.get("add_bos_token")
  if adds_bos is None:
    adds_bos = tokens["bos"] is not None and tokenizer.post_processor_adds(tokens["bos"])
  elif not isinstance(adds_bos, bool):
    raise InputError(f"folder {folder}: {TOKENIZER_CONFIG_FILE}: add_bos_token must be true or "
                     f"false, got {adds_bos!r}")
  elif adds_bos and tokens["bos"] is None:
    raise InputError(f"folder {folder}: {TOKENIZER_CONFIG_FILE} sets add_bos_token but names no "
                     "bos_token (nor does config.json a bos_token_id)")
  return tokenizer.with_special_tokens(bos_token=tokens["bos"], eos_token=tokens["eos"],
                                       adds_bos=adds_bos)


def read_folder(path: str | os.PathLike
                ) -> tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer | None]:
  """Config, float32 weights by our names (layer weights stacked, (layers, out, in)) and the
  tokenizer (None without tokenizer.json) of a Hugging Face Llama checkpoint folder. Tensors
  are read one at a time from the memory-mapped files into the stacked float32 arrays; tensors
  the config does not need are ignored."""
  folder = Path(path)
  if not (folder / CONFIG_FILE).is_file():
    raise MissingFileError(f"folder {folder} has no {CONFIG_FILE}")
  config = _read_config(folder)
  files = _tensor_files(folder)
  shapes = config.weight_shapes()

  def tensor_file(name: str) -> Path:
    file = files if isinstance(files, Path) else files.get(name)
    if file is None:
      raise InputError(f"folder {folder}: {INDEX_FILE} names no file for the tensor {name!r}")
    return file

  def opened(name: str, shape: tuple[int, ...], use) -> None:
    """Opens (memory-maps) the file of tensor `name` for this tensor alone (so the mapped
    pages of one tensor, not of a whole file, count as resident), checks the tensor's dtype and
    shape in the header, and calls use(handle, file)."""
    file = tensor_file(name)
    try:
      with safetensors.safe_open(file, framework="numpy") as handle:
        if name not in handle.keys():
          raise InputError(f"folder {folder}: {file.name} lacks the tensor {name!r}")
        tensor = handle.get_slice(name)
        if tensor.get_dtype() not in FLOAT_DTYPES:
          raise InputError(f"folder {folder}: tensor {name!r} in {file.name} has dtype "
                           f"{tensor.get_dtype()}; supported: {FLOAT_DTYPES} (quantized "
                           "checkpoints are not)")
        found = tuple(tensor.get_shape())
        if found != shape:
          raise InputError(f"folder {folder}: tensor {name!r} has shape {found}, expected "
                           f"{shape}")
        use(handle, file)
    except (safetensors.SafetensorError, OSError, TypeError, ValueError) as err:
      if isinstance(err, InputError):
        raise
      raise InputError(f"folder {folder}: tensor {name!r} in {file.name} is not readable: "
                       f"{err}") from err

  def read(name: str, shape: tuple[int, ...], out: np.ndarray) -> None:
    """Tensor `name` into `out`, as float32 (beyond float32's range: inf, refused below)."""
    def copy(handle, file):
      with np.errstate(over="ignore"):
        out[...] = handle.get_tensor(name)
      if not np.isfinite(out).all():
        raise InputError(f"folder {folder}: tensor {name!r} in {file.name} contains NaN or Inf "
                         "(or values beyond float32)")
    opened(name, shape, copy)

  family = config.family
  names = [(tensor_name(name, layer, family), shape[1:]) for name, shape in shapes.items()
           if name in LAYER_WEIGHTS for layer in range(config.num_layers)]
  names += [(tensor_name(name), shape) for name, shape in shapes.items()
            if name not in LAYER_WEIGHTS]
  for name, shape in names:  # every header first: a config that contradicts the files is
    opened(name, shape, lambda handle, file: None)  # named before any memory is allocated
  weights = {}
  for name, shape in shapes.items():
    weights[name] = np.empty(shape, np.float32)
    if name in LAYER_WEIGHTS:
      for layer in range(config.num_layers):
        read(tensor_name(name, layer, family), shape[1:], weights[name][layer])
    else:
      read(tensor_name(name), shape, weights[name])
  weights = _shift_norms(weights, config, offset=1.0)
  tokenizer_path = folder / TOKENIZER_FILE
  tokenizer = None
  if tokenizer_path.is_file():
    try:
      tokenizer = Tokenizer.from_json_str(tokenizer_path.read_text(encoding="utf-8"))
    except (InputError, UnicodeDecodeError) as err:
      raise InputError(f"folder {folder}: {TOKENIZER_FILE}: {err}") from None
    tokenizer = _special_tokens(folder, tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
      raise InputError(f"folder {folder}: {TOKENIZER_FILE} has {tokenizer.vocab_size} tokens, "
                       f"more than the vocab_size {config.vocab_size} of {CONFIG_FILE}")
  return config, weights, tokenizer
