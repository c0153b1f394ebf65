"""The q/k pruning methods of a real attention layer, by name: one uniform call for all.

`prune_qk(method, q_proj, k_proj, x, ...)` prunes a layer's q_proj and k_proj from its
calibration attention inputs x. The baselines (`baselines.BASELINES`) prune each matrix on its
own from the statistics of x; the attention-aware methods (`layer_masks.METHODS`) solve the two
together against the layer's attention matrices. Methods are pure functions of weights and
inputs: they know nothing of models or pipelines.
"""

import jax
import jax.numpy as jnp

from attnprune_jax.baselines import BASELINES, InputStats, input_stats
from attnprune_jax.errors import InputError
from attnprune_jax.layer_masks import METHODS as ATTENTION_METHODS
from attnprune_jax.layer_masks import DEFAULTS, LayerPruning, MaskSolverConfig, solve_layer
from attnprune_jax.models.llama import LlamaConfig
from attnprune_jax.sharding import problem_mesh

METHODS = ("magnitude", "wanda", "sparsegpt") + ATTENTION_METHODS
# Methods whose new weights differ from the dense ones on the support (weight updates).
REWEIGHTING = ("sparsegpt", "attn-reweight")


def prune_qk(method: str, q_proj, k_proj, x, *, sparsity: float,
             n_m: tuple[int, int] | None, config: LlamaConfig,
             solver: MaskSolverConfig | None = None, devices=None) -> LayerPruning:
  """Prunes one layer's q_proj and k_proj (out, in) with `method`.

  Args:
    method: one of `METHODS`.
    q_proj: (heads·hd, d); k_proj: (kv_heads·hd, d).
    x: the layer's calibration attention inputs (post-RMSNorm), (windows, t, d).
    sparsity: fraction removed per output row (n/m with `n_m`).
    n_m: (n, m) structure along the input axis, or None.
    config: the model's architecture (head layout, RoPE base).
    solver: settings of the attention-aware methods (None: their defaults); must be None for
      the baselines.
    devices: devices to shard an attention-aware solve over (KV groups and each step's
      windows, `sharding.problem_mesh`); None runs where the inputs are. The baselines run
      where the inputs are.
  Returns:
    a `LayerPruning`; its loss is empty for the baselines.
  """
  if method in ATTENTION_METHODS:
    solver = DEFAULTS[method] if solver is None else solver
    mesh = None if devices is None else problem_mesh(config.num_kv_heads,
                                                     solver.windows_per_step, devices)
    return solve_layer(q_proj, k_proj, x, method=method, sparsity=sparsity, n_m=n_m,
                       config=solver, num_kv_heads=config.num_kv_heads,
                       head_dim=config.head_dim, rope=config.rope, mesh=mesh)
  if method not in BASELINES:
    raise InputError(f"method must be one of {METHODS}, got {method!r}")
  if solver is not None:
    raise InputError(f"solver settings apply to {ATTENTION_METHODS}, not to {method!r}")
  stats = input_stats(x.reshape(-1, x.shape[-1]), gram=BASELINES[method].needs_gram)
  new_q, keep_q = prune_linear(method, q_proj, stats, sparsity, n_m)
  new_k, keep_k = prune_linear(method, k_proj, stats, sparsity, n_m)
  return LayerPruning(new_q, new_k, keep_q, keep_k, jnp.zeros((0,), x.dtype))


def prune_linear(method: str, w, stats: InputStats, sparsity: float,
                 n_m: tuple[int, int] | None) -> tuple[jax.Array, jax.Array]:
  """Prunes one linear w (out, in) with the baseline `method` (`baselines.BASELINES`) from its
  inputs' statistics (with the Gram matrix if the method needs one).

  Returns:
    (new weight in w's dtype, mask (out, in), True = kept).
  """
  new, keep = BASELINES[method].prune(w, stats, sparsity, n_m)
  return new.astype(w.dtype), keep
