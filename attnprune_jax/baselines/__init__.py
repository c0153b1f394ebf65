"""Baseline pruners on (out, in) weights: magnitude, Wanda, SparseGPT, and their registry.

`BASELINES` maps each method's name to a `Baseline`: what calibration statistic it needs and a
uniform `prune(w, stats, sparsity, n_m) -> (new_w, keep)` for a layer-by-layer pipeline.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnprune_jax.baselines.calibration import InputStats, accumulate, empty_stats, input_stats
from attnprune_jax.baselines.magnitude import magnitude
from attnprune_jax.baselines.sparsegpt import sparsegpt
from attnprune_jax.baselines.wanda import wanda


class Baseline(NamedTuple):
  """A registered pruner.

  Attributes:
    name: the `--method` name.
    needs_gram: True if the statistics must carry the Gram matrix (else the feature norms do).
    prune: (w, stats | None, sparsity, n_m) -> (new_w, keep).
  """
  name: str
  needs_gram: bool
  prune: Callable[[jax.Array, InputStats | None, float, tuple[int, int] | None],
                  tuple[jax.Array, jax.Array]]


def _masked(w, keep):
  return jnp.where(keep, w, 0), keep


BASELINES: dict[str, Baseline] = {
    # Per output row (our choice, the same group as Wanda's); magnitude(group="matrix") gives
    # the reference repositories' per-matrix threshold.
    "magnitude": Baseline("magnitude", False,
                          lambda w, stats, s, n_m: _masked(w, magnitude(w, s, n_m=n_m))),
    "wanda": Baseline("wanda", False,
                      lambda w, stats, s, n_m: _masked(w, wanda(w, stats, s, n_m=n_m))),
    "sparsegpt": Baseline("sparsegpt", True,
                          lambda w, stats, s, n_m: sparsegpt(w, stats, s, n_m=n_m)),
}

__all__ = ["BASELINES", "Baseline", "InputStats", "accumulate", "empty_stats", "input_stats",
           "magnitude", "sparsegpt", "wanda"]
