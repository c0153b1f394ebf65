"""Every pruning method, registered once.

A method is one `Method` entry: its name, what it prunes from what, whether it changes the kept
weights' values, the solver settings it starts from and its colour in figures. The command's
choices, the settings' checks, the reproduce grids and the reports' colours and labels all derive
from `REGISTRY`. Adding a method is one file holding its function plus one `register` line:

    register(Method("ria", "linear", "attnprune_jax.baselines.ria:prune"))

Two kinds, by what a method sees:
- "linear": any linear w (out, in) on its own, from statistics of its inputs:
  `prune(w, stats, sparsity, n_m) -> (new_w, keep)`, `stats` a `baselines.InputStats` (feature
  norms, and the Gram matrix XᵀX if `needs_gram`).
- "qk": a layer's q_proj and k_proj together, from the layer's attention inputs x (windows, t, d):
  `prune(q_proj, k_proj, x, *, sparsity, n_m, config, solver, mesh, attention)
  -> layer_masks.LayerPruning` (`config` the model's `LlamaConfig`, `solver` a
  `MaskSolverConfig`, `mesh` None or a device mesh for the solve, `attention` the layer's
  `models.llama.layer_attention_args`).
- "block": every target of a decoder block together (our extension beyond q/k), from the pruned
  model's residual stream entering the block:
  `prune(layer, hidden, *, targets, sparsity, n_m, config, solver, teacher, index)
  -> block_masks.BlockPruning` (`layer` the block's dense weights by name, `hidden`
  (windows, t, d), `teacher` the dense model's stream after each half, or None, `index` the
  block's index in the model).
In all, `keep` is True for kept entries and counts are exact (`patterns.kept_count` per row, or
N:M along the input axis).

The registry imports no JAX: an implementation is named "module:function" and imported when the
method first runs, so that the command answers `--help` and bad options at once.
"""

import dataclasses
import importlib
from collections.abc import Callable

from attnprune_jax.errors import InputError
from attnprune_jax.solver_config import BlockSolverConfig, MaskSolverConfig

KINDS = ("linear", "qk", "block")
# Colours of methods registered without one, in order of registration (matplotlib's names).
SPARE_COLORS = ("tab:green", "tab:brown", "tab:pink", "tab:cyan", "gold", "navy", "teal",
                "salmon")


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered pruning method.

  Attributes:
    name: the `--method` name (letters, digits and '-'; '+' joins a q/k method and a rest
      method in grids).
    kind: "linear" or "qk" (see the module docstring).
    implementation: the function, or "module:function" to import on first use.
    needs_gram: "linear" methods: the statistics must carry the Gram matrix (SparseGPT).
    changes_values: kept weights get new values (SparseGPT's update, re-weighting): reports
      compare such a method with the others that do.
    solver: "qk" methods solving for masks: the settings they start from (our choice), which
      options override; None for methods without a solver.
    color: its colour in figures; None takes one of `SPARE_COLORS`.
    summary: one line for help texts.
  """
  name: str
  kind: str
  implementation: Callable | str
  needs_gram: bool = False
  changes_values: bool = False
  solver: MaskSolverConfig | None = None
  color: str | None = None
  summary: str = ""

  def __post_init__(self):
    if not self.name or not all(c.isascii() and (c.isalnum() or c == "-") for c in self.name):
      raise InputError(f"a method's name must be letters, digits and '-', got {self.name!r}")
    if self.kind not in KINDS:
      raise InputError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")
    if self.kind == "linear" and self.solver is not None:
      raise InputError(f"{self.name}: a linear method has no solver settings")
    if self.kind != "linear" and self.needs_gram:
      raise InputError(f"{self.name}: needs_gram applies to linear methods, which get statistics")
    if self.kind == "block" and not isinstance(self.solver, BlockSolverConfig):
      raise InputError(f"{self.name}: a block method needs BlockSolverConfig settings")

  @property
  def prune(self) -> Callable:
    """The implementation, imported if it was given by name."""
    if callable(self.implementation):
      return self.implementation
    module, _, function = self.implementation.partition(":")
    return getattr(importlib.import_module(module), function)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds `method` to `REGISTRY` (a name is registered once); returns it."""
  if method.name in REGISTRY:
    raise InputError(f"a method named {method.name!r} is registered already")
  REGISTRY[method.name] = method
  return method


def names(kind: str | None = None) -> tuple[str, ...]:
  """The registered names (of one kind), in order of registration."""
  return tuple(name for name, method in REGISTRY.items() if kind in (None, method.kind))


def get(name: str, kind: str | None = None, *, argument: str = "method") -> Method:
  """The method registered as `name` (of `kind`, if given); an InputError naming `argument`
  and the choices."""
  method = REGISTRY.get(name)
  if method is None or kind not in (None, method.kind):
    raise InputError(f"{argument} must be one of {names(kind)}, got {name!r}",
                     argument=argument)
  return method


def color(name: str) -> str:
  """The figure colour of a method, or of the q/k method of 'qk+rest' (any 'allocation:'
  prefix dropped)."""
  method = REGISTRY.get(name.rpartition(":")[2].partition("+")[0])
  if method is None:
    return "black"
  if method.color is not None:
    return method.color
  spare = [m for m in REGISTRY.values() if m.color is None]
  return SPARE_COLORS[spare.index(method) % len(SPARE_COLORS)]


register(Method("magnitude", "linear", "attnprune_jax.baselines.magnitude:prune",
                color="tab:gray", summary="the largest |W| per output row"))
register(Method("wanda", "linear", "attnprune_jax.baselines.wanda:prune", color="tab:blue",
                summary="Wanda: |W_ij|·‖X_j‖ per output row"))
register(Method("sparsegpt", "linear", "attnprune_jax.baselines.sparsegpt:prune",
                needs_gram=True, changes_values=True, color="tab:purple",
                summary="SparseGPT: OBS with the inputs' Hessian, kept weights updated"))
register(Method("attn", "qk", "attnprune_jax.layer_masks:prune_attn",
                solver=MaskSolverConfig(lam=1e-2), color="tab:olive",
                summary="the paper's Algorithm 1 on the layer's attention, then one cut"))
register(Method("attn-progressive", "qk", "attnprune_jax.layer_masks:prune_attn_progressive",
                solver=MaskSolverConfig(), color="tab:red",
                summary="optimizer rounds between prune steps on the attention; dense values kept"))
register(Method("attn-reweight", "qk", "attnprune_jax.layer_masks:prune_attn_reweight",
                solver=MaskSolverConfig(), changes_values=True, color="tab:orange",
                summary="as attn-progressive, then the kept weights re-weighted"))
register(Method("attn-block", "block", "attnprune_jax.block_masks:prune_attn_block",
                solver=BlockSolverConfig(), color="darkred",
                summary="every target's mask fitted to its block half's output (and the "
                        "attention matrix); dense values kept"))
register(Method("attn-block-reweight", "block",
                "attnprune_jax.block_masks:prune_attn_block_reweight",
                solver=BlockSolverConfig(), changes_values=True, color="darkorange",
                summary="as attn-block, then the kept weights re-weighted"))
