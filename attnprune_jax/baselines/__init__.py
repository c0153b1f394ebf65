"""Baseline pruners on (out, in) weights: magnitude, Wanda, SparseGPT, and the input statistics
they are computed from. Each module's `prune(w, stats, sparsity, n_m) -> (new_w, keep)` is the
method registered under its name in `methods`.
"""

from attnprune_jax.baselines.calibration import InputStats, accumulate, empty_stats, input_stats
from attnprune_jax.baselines.magnitude import magnitude
from attnprune_jax.baselines.sparsegpt import sparsegpt
from attnprune_jax.baselines.wanda import wanda

__all__ = ["InputStats", "accumulate", "empty_stats", "input_stats", "magnitude", "sparsegpt",
           "wanda"]
