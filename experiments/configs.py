"""The settings of the experiments, as plain data without JAX (the command builds its options
from them and checks them before loading JAX). All values are our choice."""

import dataclasses

from attnprune_jax import validation
from attnprune_jax.errors import InputError
from attnprune_jax.patterns import kept_count

MAX_DEMO_ENTRIES = 2**26  # our choice: 256 MiB of float32 per array of the demo


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Settings of the demo (all our choice)."""
  n: int = 128
  d: int = 64
  batch: int = 4
  rank: int = 16
  lam: float = 1e-2
  steps: int = 500
  step_fraction: float = 1.0
  sparsities: tuple[float, ...] = (0.5, 0.7, 0.9)
  causal: bool = True
  seed: int = 0

  def __post_init__(self):
    for name in ("n", "d", "batch", "rank"):
      validation.check_positive_int(name, getattr(self, name))
    validation.check_positive_int("steps", self.steps, maximum=validation.MAX_STEPS)
    if self.rank > self.d:
      raise InputError(f"rank must be at most d={self.d}, got {self.rank}", argument="rank")
    validation.check_scalar("lam", self.lam, minimum=0.0)
    validation.check_scalar("step_fraction", self.step_fraction, minimum=0.0, strict=True)
    if self.d < 4:
      raise InputError(f"d must be at least 4 (the inputs have 4 outlier channels), got {self.d}",
                       argument="d")
    entries = max(self.batch * self.n * max(self.n, self.d), self.d**2)  # scores, inputs, W
    if entries > MAX_DEMO_ENTRIES:
      raise InputError(f"batch x n x max(n, d) and d x d must be at most {MAX_DEMO_ENTRIES} (a "
                       f"small head), got {entries}", argument="n")
    if not self.sparsities:
      raise InputError("sparsities must name at least one sparsity", argument="sparsities")
    for sparsity in self.sparsities:
      validation.check_sparsity(sparsity, "sparsities")
      if kept_count(self.d, sparsity) < 1:
        raise InputError(f"sparsities {sparsity:g} keeps none of the d={self.d} entries of a "
                         "row; a row must keep at least one", argument="sparsities")
    validation.check_bool("causal", self.causal)
    if (isinstance(self.seed, bool) or not isinstance(self.seed, int)
        or not -2**63 <= self.seed < 2**63):  # what jax.random.key takes
      raise InputError(f"seed must be a 64-bit integer, got {self.seed!r}", argument="seed")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Settings of the synthetic experiments (all our choice)."""
  lams: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
  step_fractions: tuple[float, ...] = (0.25, 0.5, 1.0, 1.9)
  sizes: tuple[tuple[int, int], ...] = ((32, 16), (64, 32), (128, 64))
  causal: tuple[bool, ...] = (True, False)
  seeds: tuple[int, ...] = (0, 1, 2)
  batch: int = 2
  steps: int = 4000
  history_points: int = 400
  segments: int = 4
  power_iters: int = 100
  sweep_size: tuple[int, int] = (128, 64)
  sweep_batch: int = 4
  sweep_seeds: tuple[int, ...] = (0, 1, 2)
  sparsities: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
  sweep_power_iters: int = 100  # L̂ at M₀ for the sweep's step sizes
  attn_lam: float = 1e-2
  attn_steps: int = 1000
  progressive_lam: float = 1e-3
  progressive_rounds: int = 10
  progressive_steps: int = 30


SYNTHETIC_QUICK = SyntheticConfig(lams=(1e-2, 1e-1, 1.0), step_fractions=(0.5, 1.9),
                                  sizes=((32, 16),), seeds=(0,), steps=400, power_iters=50,
                                  sweep_size=(64, 32), attn_steps=300, sweep_seeds=(0,),
                                  sparsities=(0.5, 0.7, 0.9))


@dataclasses.dataclass(frozen=True)
class RealConfig:
  """Settings of the real-weight experiment (all our choice).

  Attributes:
    layers: the layers to run; None for six evenly spaced from the first to the last.
    windows, ctx: calibration windows of Emma (start token + ctx − 1 tokens) the solver sees.
    heldout_windows: the Emma windows after them, which score the binary masks.
    lams, step_fractions: the grid; η = step_fraction / L̂ per head, L̂ measured at M₀.
    steps, segments, power_iters, history_points: as in `convergence.convergence_runs`.
    sparsities, attn_*, progressive_*: as in `convergence.sparsity_comparison`.
    float64_heads, float64_steps: heads whose first run (the grid's first λ and step size)
      is solved again in float64 for its first float64_steps steps, to bound the float32 error
      of the recorded loss histories.
  """
  layers: tuple[int, ...] | None = None
  windows: int = 2
  ctx: int = 128
  heldout_windows: int = 2
  lams: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
  step_fractions: tuple[float, ...] = (0.5, 1.9)
  steps: int = 160
  segments: int = 2
  power_iters: int = 20
  history_points: int = 200
  sparsities: tuple[float, ...] = (0.5, 0.7, 0.9)
  attn_lam: float = 1e-2
  attn_steps: int = 160
  progressive_lam: float = 1e-3
  progressive_rounds: int = 5
  progressive_steps: int = 20
  float64_heads: tuple[int, ...] = (0,)
  float64_steps: int = 50

  def __post_init__(self):
    for name in ("windows", "heldout_windows", "segments", "power_iters", "history_points"):
      validation.check_positive_int(name, getattr(self, name))
    if isinstance(self.ctx, bool) or not isinstance(self.ctx, int) or self.ctx < 2:
      raise InputError(f"ctx must be an integer >= 2 (a start token and text), got "
                       f"{self.ctx!r}", argument="ctx")
    validation.check_positive_int("steps", self.steps, maximum=validation.MAX_STEPS)
    if self.steps < 10:
      raise InputError(f"steps must be at least 10 (a rate is fitted to them), got {self.steps}",
                       argument="steps")
    if self.layers is not None and (not self.layers or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)):
      raise InputError(f"layers must be layer indices >= 0, got {self.layers}", argument="layers")


REAL_QUICK = RealConfig(layers=(0,), windows=1, ctx=32, heldout_windows=1, lams=(1e-2, 1.0),
                        steps=30, segments=1, power_iters=10, history_points=30,
                        sparsities=(0.7,), attn_steps=30, progressive_rounds=2,
                        progressive_steps=5, float64_steps=10)
