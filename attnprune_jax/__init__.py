"""attnprune_jax: attention-matrix-aware weight pruning (Liang et al., arXiv 2410.11261).

The public API below is imported on first use, so that importing a submodule that needs no JAX
(the settings, the method registry, the command line) does not load it.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "MaskSolution": "attnprune_jax.solver",
    "attention_error": "attnprune_jax.objective",
    "attention_matrix": "attnprune_jax.attention",
    "binarize": "attnprune_jax.masks",
    "pruning_grad": "attnprune_jax.objective",
    "pruning_loss": "attnprune_jax.objective",
    "solve_mask": "attnprune_jax.solver",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
  if name not in _PUBLIC:
    raise AttributeError(f"module 'attnprune_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_PUBLIC[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_PUBLIC))
