"""Section 6.1 of the paper: convergence of Algorithm 1 on synthetic problems, with the
constants derived here (docs/theory.md), and a sparsity sweep of binary masks.

Convergence runs sweep λ, the step size (as a fraction of 1/L̂, L̂ measured at M₀), the size
(n, d), causal or not, and seeds. Each run is solved in segments; the Hessian norm is measured at
the start of every segment and the largest value is the run's measured L_s. The sparsity sweep
compares binary masks from magnitude, the merged-form Wanda score |W_ij|·‖X_i‖·‖X_j‖
(`wanda-merged`, not `baselines.wanda`), Algorithm 1 then binarize (`attn`) and progressive
sparsification (`attn-progressive`).

Runs in float64 (`jax.enable_x64`) so that rates can be fitted far below float32 rounding. Every
finished run is written atomically to DIR/runs/ with the fingerprint of the code that made it
(`CODE`) and its git commit, and skipped by a rerun with the same settings and fingerprint: an
interrupted sweep loses nothing it finished. A stored file that cannot be read is moved aside to
`<name>.damaged` with a warning and computed again. All settings are our choice.
"""

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from attnprune_jax.reporting import Reporter
from attnprune_jax.results import cached_result, code_fingerprint, git_commit, reuse_record
from attnprune_jax.synthetic import synthetic_problem
from experiments import convergence
from experiments.convergence import summarize

# The modules whose source a stored result depends on (the figures, `convergence_report`, are
# not among them).
CODE = tuple(f"attnprune_jax.{name}" for name in (
    "attention", "objective", "solver", "theory", "masks", "synthetic", "validation")) + (
        "experiments.convergence", __name__)


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


QUICK = SyntheticConfig(lams=(1e-2, 1e-1, 1.0), step_fractions=(0.5, 1.9), sizes=((32, 16),),
                        seeds=(0,), steps=400, power_iters=50, sweep_size=(64, 32),
                        attn_steps=300, sweep_seeds=(0,), sparsities=(0.5, 0.7, 0.9))


def _problem(n: int, d: int, batch: int, seed: int):
  return synthetic_problem(jax.random.key(seed), n=n, d=d, batch=batch, rank=max(d // 4, 2),
                           dtype=jnp.float64)


def convergence_run(config: SyntheticConfig, *, n: int, d: int, lam: float,
                    step_fraction: float, causal: bool, seed: int) -> dict:
  """One run of Algorithm 1 with its measured and derived constants."""
  start = time.perf_counter()
  w, x = _problem(n, d, config.batch, seed)
  record, = convergence.convergence_runs(
      w, x, lam=lam, step_fraction=step_fraction, causal=causal, steps=config.steps,
      segments=config.segments, power_iters=config.power_iters,
      history_points=config.history_points, key=jax.random.key(seed + 1000))
  return {"n": n, "d": d, "seed": seed, **record, "wall_time_s": time.perf_counter() - start}


def sparsity_sweep(config: SyntheticConfig, *, seed: int) -> list[dict]:
  """Attention error of binary masks at each sparsity, for every method, on one problem
  (`convergence.sparsity_comparison`, scored on the problem's own inputs)."""
  n, d = config.sweep_size
  w, x = _problem(n, d, config.sweep_batch, seed)
  rows = convergence.sparsity_comparison(
      w, x, x, sparsities=config.sparsities, attn_lam=config.attn_lam,
      attn_steps=config.attn_steps, progressive_lam=config.progressive_lam,
      progressive_rounds=config.progressive_rounds, progressive_steps=config.progressive_steps,
      power_iters=config.sweep_power_iters, key=jax.random.key(seed + 2000))
  return [{**row, "seed": seed} for row in rows]


def _run_settings(config: SyntheticConfig) -> dict:
  """The settings a stored convergence run depends on (besides its own grid point)."""
  return {k: getattr(config, k) for k in ("batch", "steps", "segments", "power_iters",
                                          "history_points")}


def _sweep_settings(config: SyntheticConfig) -> dict:
  keys = ("sweep_size", "sweep_batch", "sparsities", "sweep_power_iters", "attn_lam",
          "attn_steps", "progressive_lam", "progressive_rounds", "progressive_steps")
  return {k: getattr(config, k) for k in keys}


def run(config: SyntheticConfig, out: Path, reporter: Reporter) -> dict:
  """Runs (or resumes) every convergence run and the sparsity sweep; returns all results.

  Under "provenance": the code fingerprint, and how many stored results (runs and sweep seeds)
  were reused, by the commit that made them.
  """
  out = Path(out)
  code = {"fingerprint": code_fingerprint(CODE), "git_commit": git_commit()}
  grid = [(n, d, lam, fraction, causal, seed) for (n, d) in config.sizes for lam in config.lams
          for fraction in config.step_fractions for causal in config.causal
          for seed in config.seeds]
  runs, sweep, origins = [], [], []
  with jax.enable_x64(True):
    for n, d, lam, fraction, causal, seed in reporter.progress(grid, desc="convergence runs"):
      name = f"n{n}_d{d}_lam{lam:g}_step{fraction:g}_{'causal' if causal else 'full'}_seed{seed}"
      result, origin = cached_result(
          out / "runs" / f"{name}.json", _run_settings(config), code,
          lambda: convergence_run(config, n=n, d=d, lam=lam, step_fraction=fraction,
                                  causal=causal, seed=seed))
      runs.append(result)
      origins.append(origin)
    for seed in reporter.progress(config.sweep_seeds, desc="sparsity sweep"):
      rows, origin = cached_result(out / "sweep" / f"seed{seed}.json", _sweep_settings(config),
                                   code, lambda: sparsity_sweep(config, seed=seed))
      sweep.extend(rows)
      origins.append(origin)
  reused = reuse_record(origins)
  if reused["count"]:
    reporter.info(f"resumed: {reused['count']} finished results were reused from {out}")
  return {"config": dataclasses.asdict(config), "runs": runs, "sparsity_sweep": sweep,
          "summary": summarize(runs, sweep),
          "provenance": {"code_fingerprint": code["fingerprint"], "reused_runs": reused}}
