"""What a pruning run is told to do: its settings, its token windows, the reproduce grids.

Plain data that checks itself on construction (an `InputError` naming the setting), without
JAX, so that a command refuses a bad option at once. `runs` does the work.
"""

import dataclasses

from attnprune_jax import methods, validation
from attnprune_jax.allocation import ALLOCATIONS
from attnprune_jax.errors import InputError
from attnprune_jax.patterns import check_n_m, kept_count, parse_pattern, pattern_name
from attnprune_jax.solver_config import MaskSolverConfig

QK = ("q_proj", "k_proj")
ATTENTION = QK + ("v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# The linears each `targets` prunes in every chosen layer; embeddings and LM head stay dense.
TARGETS = {"qk": QK, "attention": ATTENTION, "all": ATTENTION + MLP}
# SparseGPT's --true-sequential order of a block's linears.
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"),
                     ("down_proj",))


@dataclasses.dataclass(frozen=True)
class PruneSettings:
  """What to prune and how.

  Attributes:
    method: a registered method (`methods.REGISTRY`) for q_proj and k_proj, and for the other
      targets if `rest` is None (then it must be a "linear" method).
    sparsity: fraction of every target's entries removed per output row, in [0, 1) (n/m for
      N:M); or one such fraction per layer of `layers` (a per-layer allocation, unstructured).
    n_m: (n, m) structure along the input axis, or None for unstructured.
    layers: indices of the layers to prune, in increasing order; None: every layer.
    solver: settings of a method with a solver; None takes the method's own
      (`Method.solver`), and is replaced by them so that results say what ran.
    targets: a key of `TARGETS`: "qk", "attention" (+ v/o_proj) or "all" (+ gate/up/down_proj).
    rest: a "linear" method for the targets other than q/k, or None for `method` itself.
    true_sequential: prune a block's groups (`SEQUENTIAL_GROUPS`) one after the other, each
      from the inputs of the block with the groups before it pruned.
    allocation: how `sparsity` is shared among the layers (`allocation.ALLOCATIONS`): "uniform",
      or "owl" (OWL's outlier-weighted sparsities, resolved from the dense model's calibration
      inputs when the run starts; unstructured only).
  """
  method: str
  sparsity: float | tuple[float, ...]
  n_m: tuple[int, int] | None = None
  layers: tuple[int, ...] | None = None
  solver: MaskSolverConfig | None = None
  targets: str = "qk"
  rest: str | None = None
  true_sequential: bool = False
  allocation: str = "uniform"

  def __post_init__(self):
    method = methods.get(self.method)
    if self.solver is None:
      object.__setattr__(self, "solver", method.solver)
    elif method.solver is None:
      raise InputError(f"solver settings apply to the methods with a solver "
                       f"{tuple(n for n, m in methods.REGISTRY.items() if m.solver)}, not to "
                       f"{self.method!r}", argument="solver")
    elif not isinstance(self.solver, type(method.solver)):
      raise InputError(f"solver must be a {type(method.solver).__name__}, got {self.solver!r}",
                       argument="solver")
    if isinstance(self.sparsity, (tuple, list)):
      if self.n_m is not None:
        raise InputError("a sparsity per layer is unstructured; an N:M pattern takes one "
                         "sparsity", argument="sparsity")
      values = tuple(validation.check_sparsity(s) for s in self.sparsity)
      if not values:
        raise InputError("sparsity must be a number or one per layer, got ()",
                         argument="sparsity")
      object.__setattr__(self, "sparsity", values)
    else:
      object.__setattr__(self, "sparsity", validation.check_sparsity(self.sparsity))
    if self.n_m is not None:
      object.__setattr__(self, "n_m", check_n_m(self.n_m, self.sparsity))
    if self.layers is not None:
      layers = tuple(self.layers)
      if (not layers or list(layers) != sorted(set(layers))
          or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        raise InputError(f"layers must be distinct indices >= 0 in increasing order, got "
                         f"{self.layers}", argument="layers")
      object.__setattr__(self, "layers", layers)
      if isinstance(self.sparsity, tuple) and len(self.sparsity) != len(layers):
        raise InputError(f"sparsity must be one number or one per layer ({len(layers)}), got "
                         f"{len(self.sparsity)}", argument="sparsity")
    if self.targets not in TARGETS:
      raise InputError(f"targets must be one of {tuple(TARGETS)}, got {self.targets!r}",
                       argument="targets")
    if self.rest is not None:
      methods.get(self.rest, "linear", argument="rest")
      if method.kind == "block":
        raise InputError(f"{self.method} prunes every target of a block itself; rest applies "
                         "to the q/k methods", argument="rest")
      if self.targets == "qk":
        raise InputError(f"rest={self.rest!r} prunes the targets beyond q/k; with targets 'qk' "
                         "there are none (choose targets 'attention' or 'all')", argument="rest")
    if self.targets != "qk" and self.rest is None and method.kind == "qk":
      raise InputError(f"{self.method} prunes only q_proj and k_proj: targets {self.targets!r} "
                       f"need a linear method for the other linears, one of "
                       f"{methods.names('linear')} (rest=; prune --rest; reproduce --methods "
                       "METHOD+BASELINE, e.g. attn-progressive+wanda)", argument="rest")
    validation.check_bool("true_sequential", self.true_sequential)
    if self.allocation not in ALLOCATIONS:
      raise InputError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}",
                       argument="allocation")
    if self.allocation != "uniform" and (self.n_m is not None
                                         or isinstance(self.sparsity, tuple)):
      raise InputError(f"allocation {self.allocation!r} shares one unstructured sparsity among "
                       "the layers: an N:M pattern must be the same in every layer for N:M "
                       "hardware to run it, and a sparsity per layer is an allocation already",
                       argument="allocation")
    if self.true_sequential and method.kind == "block":
      raise InputError(f"{self.method} prunes a block's attention half, then its MLP on the "
                       "pruned half's output: it is sequential already", argument="true_sequential")
    if self.true_sequential and self.targets == "qk":
      raise InputError("true_sequential orders a block's groups of linears; targets 'qk' are "
                       "one group (choose targets 'attention' or 'all')",
                       argument="true_sequential")

  @property
  def name(self) -> str:
    """The method, 'method+rest' when the other targets have their own, prefixed by
    'allocation:' unless uniform (e.g. 'owl:wanda')."""
    name = self.method if self.rest is None else f"{self.method}+{self.rest}"
    return name if self.allocation == "uniform" else f"{self.allocation}:{name}"

  @property
  def pattern(self) -> str:
    """'unstructured', 'N:M', or 'per-layer' for a sparsity per layer (its rows are told
    apart from the uniform ones at the same mean sparsity)."""
    return "per-layer" if isinstance(self.sparsity, tuple) else pattern_name(self.n_m)

  @property
  def mean_sparsity(self) -> float:
    """The sparsity, or the mean of the per-layer ones (every layer's targets alike)."""
    if isinstance(self.sparsity, tuple):
      return sum(self.sparsity) / len(self.sparsity)
    return self.sparsity

  def sparsity_of(self, layer: int) -> float:
    """The sparsity of `layer`, one of `layers`."""
    if not isinstance(self.sparsity, tuple):
      return self.sparsity
    return self.sparsity[self.layers.index(layer)]

  def method_of(self, target: str) -> methods.Method:
    """The method that prunes `target` (a weight name of `TARGETS`)."""
    return methods.get(self.method if target in QK or self.rest is None else self.rest)

  def groups(self) -> tuple[tuple[str, ...], ...]:
    """The targets of a block in the order they are pruned, one group per forward."""
    targets = TARGETS[self.targets]
    if not self.true_sequential:
      return (targets,)
    return tuple(kept for group in SEQUENTIAL_GROUPS
                 if (kept := tuple(t for t in group if t in targets)))

  def for_model(self, config) -> "PruneSettings":
    """These settings with `layers` resolved for a model (`LlamaConfig`): None becomes every
    layer; an InputError unless the layers exist and every target's rows take the pattern."""
    layers = tuple(range(config.num_layers)) if self.layers is None else self.layers
    if layers[-1] >= config.num_layers:
      raise InputError(f"layers must lie in 0-{config.num_layers - 1}, got {layers}",
                       argument="layers")
    resolved = dataclasses.replace(self, layers=layers)
    shapes = config.weight_shapes()
    for target in TARGETS[self.targets]:
      cols = shapes[target][-1]
      if self.n_m is not None:
        try:
          check_n_m(self.n_m, self.sparsity, cols)
        except InputError as err:
          raise InputError(f"{target}: {err}", argument="pattern") from None
        continue
      for sparsity in set(resolved.sparsity if isinstance(self.sparsity, tuple)
                          else (self.sparsity,)):
        if kept_count(cols, sparsity) == 0:
          raise InputError(f"sparsity {sparsity:g} keeps none of the {cols} entries of a "
                           f"{target} row; a row must keep at least one", argument="sparsity")
    return resolved

  def check_windows(self, calibration_windows: int) -> None:
    """An InputError unless the solver's windows per step divide the calibration windows."""
    if self.solver is not None and calibration_windows % self.solver.windows_per_step:
      raise InputError(f"windows_per_step ({self.solver.windows_per_step}) must divide the "
                       f"calibration windows ({calibration_windows})",
                       argument="windows_per_step")

  def to_json(self) -> dict:
    return {"method": self.method,
            "sparsity": list(self.sparsity) if isinstance(self.sparsity, tuple)
                        else self.sparsity,
            "n_m": None if self.n_m is None else list(self.n_m),
            "layers": None if self.layers is None else list(self.layers),
            "solver": None if self.solver is None else dataclasses.asdict(self.solver),
            "targets": self.targets, "rest": self.rest,
            "true_sequential": self.true_sequential,
            # Only when not uniform: the settings of rows stored before allocations keep
            # their keys (they were uniform).
            **({} if self.allocation == "uniform" else {"allocation": self.allocation})}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The fixed token windows of a run (our choice; the paper used 8 C4 sentences for
  calibration and 128 C4 validation sentences for perplexity).

  Attributes:
    calib_seqs: calibration windows (Emma) the methods see.
    calib_len: tokens per window (start token + text), for every window kind.
    heldout_seqs: Emma windows after the calibration ones, for the attention errors.
    eval_tokens: evaluation budget: eval_tokens // calib_len windows of Pride and Prejudice.
    batch: windows per forward pass of the perplexity.
  """
  calib_seqs: int = 8
  calib_len: int = 512
  heldout_seqs: int = 4
  eval_tokens: int = 16384
  batch: int = 4

  def __post_init__(self):
    for name in ("calib_seqs", "calib_len", "heldout_seqs", "eval_tokens", "batch"):
      validation.check_positive_int(name, getattr(self, name))
    if self.calib_len < 2:
      raise InputError(f"calib_len must be at least 2 (a start token and one text token), got "
                       f"{self.calib_len}", argument="calib_len")
    if self.eval_tokens < self.calib_len:
      raise InputError(f"eval_tokens must be at least calib_len={self.calib_len} (one window), "
                       f"got {self.eval_tokens}", argument="eval_tokens")

  @property
  def eval_windows(self) -> int:
    return self.eval_tokens // self.calib_len


def split_method(name: str) -> tuple[str, str | None, str]:
  """A row's name as (method, rest, allocation): 'attn-progressive+wanda' ->
  ('attn-progressive', 'wanda', 'uniform'); 'owl:wanda' -> ('wanda', None, 'owl')."""
  allocation, _, name = name.rpartition(":")
  method, _, rest = name.partition("+")
  return method, rest or None, allocation or "uniform"


def quick_layers(num_layers: int) -> tuple[int, ...]:
  """The layers nearest 1/6, 1/2 and 5/6 of the depth (5, 15, 25 of SmolLM2's 30; 3, 8, 13 of
  Llama 3.2-1B's 16); in very shallow models some coincide (3 layers: 0, 2)."""
  return tuple(sorted({min(num_layers - 1, round(num_layers * fraction))
                       for fraction in (1 / 6, 1 / 2, 5 / 6)}))


# Rows run sparsity by sparsity in this order (the most telling first), cheap methods first, so
# that an interrupted run has the comparisons that matter most.
QK_SPARSITIES = ("0.7", "2:4", "0.8", "0.5")
QK_METHODS = ("magnitude", "wanda", "sparsegpt", "attn-progressive", "attn-reweight", "attn")
# Beyond the paper: every linear of every block pruned (issue 12), the usual pruner everywhere
# against the attention-aware q/k within it, at the same sparsity of every target.
WHOLE_MODEL_SPARSITIES = ("0.6", "2:4", "0.7", "0.5")
# Mask-only methods, then those that change values; OWL rows (owl:NAME) at unstructured
# sparsities only.
WHOLE_MODEL_METHODS = ("magnitude", "wanda", "owl:wanda", "attn-progressive+wanda", "attn-block",
                       "owl:attn-block", "sparsegpt", "owl:sparsegpt", "attn-reweight+sparsegpt",
                       "attn-block-reweight", "owl:attn-block-reweight")
# The results file of each kind of grid (results/NAME.json) and its `kind` field.
RESULTS = {"qk": ("qk_pruning", "qk-pruning"), "attention": ("attention_linears",
                                                            "attention-linears"),
           "all": ("whole_model", "whole-model")}
SIZES = ("default", "quick", "full")


@dataclasses.dataclass(frozen=True)
class Grid:
  """The rows of `reproduce`: every method at every sparsity, plus the dense row (all our
  choice; the paper's sparsities are not known).

  Attributes:
    sparsities: '0.7' or 'N:M' strings, run in this order.
    methods: registered names, or 'qk_method+rest_method' beyond targets 'qk'.
    layers: the layers pruned; None: every layer (`quick` picks three by the model's depth).
    data: the token windows.
    targets: a key of `TARGETS`.
    quick: the layers of `quick_layers` instead of `layers`.
  """
  sparsities: tuple[str, ...] = QK_SPARSITIES
  methods: tuple[str, ...] = QK_METHODS
  layers: tuple[int, ...] | None = None
  data: DataConfig = DataConfig()
  targets: str = "qk"
  quick: bool = False

  def __post_init__(self):
    if not self.sparsities or not self.methods:
      raise InputError("a grid needs at least one sparsity and one method", argument="methods")
    for sparsity in self.sparsities:
      parse_pattern(sparsity)
    for name in self.methods:
      try:
        sparsities = [s for s in self.sparsities if self.applies(name, s)]
        if not sparsities:
          raise InputError(f"an allocation applies to unstructured sparsities only, not to "
                           f"{self.sparsities}")
        self.settings(name, sparsities[0])
      except InputError as err:
        raise InputError(f"{name} with targets {self.targets}: {err}",
                         argument="methods") from None

  @property
  def stem(self) -> str:
    """The name of its results file, e.g. 'qk_pruning'."""
    return RESULTS[self.targets][0]

  @staticmethod
  def applies(name: str, sparsity: str) -> bool:
    """Whether row `name` runs at `sparsity`: a non-uniform allocation (e.g. 'owl:wanda')
    only at unstructured sparsities (N:M hardware needs one pattern in every layer)."""
    return split_method(name)[2] == "uniform" or parse_pattern(sparsity)[1] is None

  def settings(self, name: str, sparsity: str) -> PruneSettings:
    """The `PruneSettings` of one row ('method' or 'method+rest' at '0.7' or '2:4')."""
    method, rest, allocation = split_method(name)
    value, n_m = parse_pattern(sparsity)
    return PruneSettings(method, value, n_m, self.layers, targets=self.targets, rest=rest,
                         allocation=allocation)


def reproduce_grid(targets: str = "qk", size: str = "default",
                   methods: tuple[str, ...] | None = None,
                   sparsities: tuple[str, ...] | None = None) -> Grid:
  """The grid `reproduce` runs for `targets` at `size`:
  - qk: every method at 0.7, 2:4, 0.8, 0.5 (full: also 0.3, 0.6, 0.9; quick, for `make demo`:
    four methods at 0.7 on three layers, windows of 256 tokens, 2k evaluation tokens);
  - attention / all: the baselines (uniform and OWL) and the attention-aware methods (q/k inside a
    baseline, and the whole-block ones) at 0.6, 2:4, 0.7 and 0.5 (full: also 0.8; quick: 0.5 on
    three layers).
  `methods` and `sparsities` replace the grid's."""
  if targets not in TARGETS:
    raise InputError(f"targets must be one of {tuple(TARGETS)}, got {targets!r}",
                     argument="targets")
  if size not in SIZES:
    raise InputError(f"size must be one of {SIZES}, got {size!r}", argument="size")
  quick_data = DataConfig(calib_len=256, eval_tokens=2048)  # our choice: a demo in minutes
  if targets == "qk":
    grid = {"default": Grid(),
            "full": Grid(sparsities=QK_SPARSITIES + ("0.3", "0.6", "0.9")),
            "quick": Grid(sparsities=("0.7",), quick=True, data=quick_data,
                          methods=("wanda", "sparsegpt", "attn-progressive", "attn-reweight"))
            }[size]
  else:
    grid = Grid(sparsities={"default": WHOLE_MODEL_SPARSITIES,
                            "full": WHOLE_MODEL_SPARSITIES + ("0.8",), "quick": ("0.5",)}[size],
                methods=WHOLE_MODEL_METHODS, targets=targets,
                quick=size == "quick", data=quick_data if size == "quick" else DataConfig())
  if methods is not None:
    grid = dataclasses.replace(grid, methods=tuple(methods))
  if sparsities is not None:
    grid = dataclasses.replace(grid, sparsities=tuple(sparsities))
  return grid
