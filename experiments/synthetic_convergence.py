"""Section 6.1 of the paper: convergence of Algorithm 1 on synthetic problems, with the
constants derived here (docs/theory.md), and a sparsity sweep of binary masks.

Convergence runs sweep λ, the step size (as a fraction of 1/L̂, L̂ measured at M₀), the size
(n, d), causal or not, and seeds. Each run is solved in segments; the Hessian norm is measured at
the start of every segment and the largest value is the run's measured L_s. The sparsity sweep
compares binary masks from magnitude, the merged-form Wanda score |W_ij|·‖X_i‖·‖X_j‖
(`wanda-merged`, not `baselines.wanda`), Algorithm 1 then binarize (`attn`) and progressive
sparsification (`attn-progressive`).

Runs in float64 (`jax.enable_x64`) so that rates can be fitted far below float32 rounding. Every
finished run is written atomically to DIR/runs/ with its settings, the numerics version
(`numerics.SYNTHETIC`) and its git commit, and skipped by a rerun with the same settings and
version: an interrupted sweep loses nothing it finished. A stored file that cannot be read is moved aside to
`<name>.damaged` with a warning and computed again. All settings are our choice.
"""

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from attnprune_jax import numerics
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import cached_result, reuse_record
from attnprune_jax.synthetic import synthetic_problem
from experiments import convergence
from experiments.configs import SyntheticConfig
from experiments.convergence import summarize


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


GOLDEN_FIELDS = ("loss", "smoothness_measured", "smoothness_bound", "pl_xi", "rate_measured")


def golden_sample(runs: list[dict]) -> dict:
  """The first run's grid point and measurements (`GOLDEN_FIELDS`; its loss history at the first
  and last recorded step): the sample of the committed figures that the tests recompute."""
  first = runs[0]
  sample = {key: first[key] for key in ("n", "d", "lam", "step_fraction", "causal", "seed")}
  return sample | {key: first[key] for key in GOLDEN_FIELDS if key != "loss"} | {
      "loss_first": first["loss"][0], "loss_last": first["loss"][-1]}


def run(config: SyntheticConfig, out: Path, reporter: Reporter) -> dict:
  """Runs (or resumes) every convergence run and the sparsity sweep; returns all results.

  Under "provenance": the numerics version, and how many stored results (runs and sweep seeds)
  were reused, by the commit that made them.
  """
  out = Path(out)
  grid = [(n, d, lam, fraction, causal, seed) for (n, d) in config.sizes for lam in config.lams
          for fraction in config.step_fractions for causal in config.causal
          for seed in config.seeds]
  runs, sweep, origins = [], [], []
  with jax.enable_x64(True):
    for n, d, lam, fraction, causal, seed in reporter.progress(grid, desc="convergence runs"):
      name = f"n{n}_d{d}_lam{lam:g}_step{fraction:g}_{'causal' if causal else 'full'}_seed{seed}"
      result, origin = cached_result(
          out / "runs" / f"{name}.json", _run_settings(config), numerics.SYNTHETIC,
          lambda: convergence_run(config, n=n, d=d, lam=lam, step_fraction=fraction,
                                  causal=causal, seed=seed))
      runs.append(result)
      origins.append(origin)
    for seed in reporter.progress(config.sweep_seeds, desc="sparsity sweep"):
      rows, origin = cached_result(out / "sweep" / f"seed{seed}.json", _sweep_settings(config),
                                   numerics.SYNTHETIC, lambda: sparsity_sweep(config, seed=seed))
      sweep.extend(rows)
      origins.append(origin)
  reused = reuse_record(origins)
  if reused["count"]:
    reporter.info(f"resumed: {reused['count']} finished results were reused from {out}")
  return {"config": dataclasses.asdict(config), "runs": runs, "golden": golden_sample(runs),
          "sparsity_sweep": sweep,
          "summary": summarize(runs, sweep),
          "provenance": {"numerics": numerics.SYNTHETIC, "reused_runs": reused}}
