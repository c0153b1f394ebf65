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
import json
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import attnprune_jax as ap
from attnprune_jax import theory
from attnprune_jax.masks import merged_activation_score
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import code_fingerprint, git_commit, write_json_atomic
from attnprune_jax.solver import solve_mask_progressive
from attnprune_jax.synthetic import synthetic_problem

METHODS = ("magnitude", "wanda-merged", "attn", "attn-progressive")
# The modules whose source a stored result depends on.
CODE = tuple(f"attnprune_jax.{name}" for name in (
    "attention", "objective", "solver", "theory", "masks", "synthetic", "validation")) + (__name__,)


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
  key = jax.random.key(seed + 1000)
  mask = jnp.ones_like(w)
  measure = lambda m: float(theory.smoothness_measured(m, w, x, lam=lam, key=key, causal=causal,
                                                       iters=config.power_iters))
  smoothness = [measure(mask)]
  lr = step_fraction / smoothness[0]
  losses, grad_norms = [], []
  for _ in range(config.segments):
    with warnings.catch_warnings():
      # Step sizes beyond 1/L_s are part of the grid; monotonicity is recorded, not warned.
      warnings.simplefilter("ignore", RuntimeWarning)
      solution = ap.solve_mask(w, x, lam=lam, steps=config.steps // config.segments, lr=lr,
                               causal=causal, init=mask)
    mask = solution.mask
    losses.append(np.asarray(solution.loss))
    grad_norms.append(np.asarray(solution.grad_norm))
    smoothness.append(measure(mask))
  loss, grad_norm = np.concatenate(losses), np.concatenate(grad_norms)
  pl = theory.pl_constants(w, x, lam=lam, causal=causal)
  smoothness_measured = max(smoothness)
  xi_needed = theory.pl_xi_needed(loss, grad_norm, mu=pl.mu)
  gap = loss - loss.min()
  positive = gap > 1e-9 * abs(loss[0])
  stride = max(1, -(-loss.size // config.history_points))
  rate = theory.measured_rate(loss)
  # L* by summing the geometric tail of the decreases at the measured rate.
  tail = (loss[-2] - loss[-1]) * rate / (1 - rate) if 0 < rate < 1 else 0.0
  return {
      "n": n, "d": d, "lam": lam, "lr": lr, "step_fraction": step_fraction, "causal": causal,
      "seed": seed, "history_stride": stride, "loss": loss[::stride].tolist(),
      "grad_norm": grad_norm[::stride].tolist(),
      "smoothness_measured": smoothness_measured, "smoothness_at_start": smoothness[0],
      "smoothness_bound": theory.smoothness_bound(w, x, lam=lam),
      "pl_mu": pl.mu, "pl_xi": pl.xi, "pl_xi_needed": xi_needed,
      "pl_holds": bool(xi_needed <= pl.xi),
      # None (JSON null) where there is nothing to measure; the reason is stored beside it.
      "pl_mu_measured": float(np.min(0.5 * grad_norm[positive]**2 / gap[positive]))
                        if positive.any() else None,
      "pl_mu_measured_note": None if positive.any() else
                             "the loss never rose above its minimum by more than rounding",
      "gradient_bound": pl.gradient_bound,
      "rate_measured": rate if np.isfinite(rate) else None,
      "rate_measured_note": None if np.isfinite(rate) else
                            "no linear phase to fit: fewer than 10 decreases above rounding",
      "loss_limit": float(loss[-1] - tail),
      "rate_predicted": theory.predicted_rate(lr, lam),
      "lr_within_bound": bool(lr * smoothness_measured <= 1.0),
      "monotone": bool(np.all(np.diff(loss) <= 1e-12 * abs(loss[0]))),
      "wall_time_s": time.perf_counter() - start,
  }


def sparsity_sweep(config: SyntheticConfig, *, seed: int) -> list[dict]:
  """Attention error of binary masks at each sparsity, for every method, on one problem.

  `attn` is Algorithm 1 (λ = attn_lam, attn_steps steps at η = 1/L̂) followed by keeping the top
  |M| per row: the learned mask read literally. (Scoring |M∘W|·‖X_i‖‖X_j‖ instead ranks like
  `wanda-merged`, since M stays close to 1.)
  """
  n, d = config.sweep_size
  w, x = _problem(n, d, config.sweep_batch, seed)
  ones = jnp.ones_like(w)
  key = jax.random.key(seed + 2000)
  attn_smoothness = float(theory.smoothness_measured(ones, w, x, lam=config.attn_lam, key=key))
  solved = ap.solve_mask(w, x, lam=config.attn_lam, steps=config.attn_steps,
                         lr=1.0 / attn_smoothness)
  scores = {"magnitude": jnp.abs(w), "wanda-merged": merged_activation_score(w, x),
            "attn": jnp.abs(solved.mask)}
  progressive_lr = 1.0 / float(theory.smoothness_measured(
      ones, w, x, lam=config.progressive_lam, key=key))
  rows = []
  for sparsity in config.sparsities:
    keeps = {method: ap.binarize(score, sparsity) for method, score in scores.items()}
    keeps["attn-progressive"] = solve_mask_progressive(
        w, x, sparsity=sparsity, lam=config.progressive_lam, lr=progressive_lr,
        rounds=config.progressive_rounds, steps_per_round=config.progressive_steps).keep
    for method in METHODS:
      keep = keeps[method]
      rows.append({"method": method, "sparsity": sparsity, "seed": seed,
                   "achieved_sparsity": float(1.0 - keep.mean()),
                   "attention_error": float(ap.attention_error(keep.astype(w.dtype), w, x))})
  return rows


def _run_settings(config: SyntheticConfig) -> dict:
  """The settings a stored convergence run depends on (besides its own grid point)."""
  return {k: getattr(config, k) for k in ("batch", "steps", "segments", "power_iters",
                                          "history_points")}


def _sweep_settings(config: SyntheticConfig) -> dict:
  keys = ("sweep_size", "sweep_batch", "sparsities", "attn_lam", "attn_steps",
          "progressive_lam", "progressive_rounds", "progressive_steps")
  return {k: getattr(config, k) for k in keys}


def _cached(path: Path, settings: dict, code: dict, compute):
  """The stored result at `path` if it was made with `settings` and `code["fingerprint"]`, else
  compute and store it with `code` (fingerprint and git commit).

  Returns the result and the commit that stored it ("unknown" outside git), or None if computed
  now. A file that is not a stored result is moved aside to `<name>.damaged`, with a warning.
  """
  settings = json.loads(json.dumps(settings))
  if path.is_file():
    try:
      stored = json.loads(path.read_text())
      if not (isinstance(stored, dict) and {"settings", "result"} <= stored.keys()):
        raise ValueError("no settings and result")
    except ValueError as err:
      damaged = path.with_name(f"{path.name}.damaged")
      path.replace(damaged)
      warnings.warn(f"synthetic: {path} is not a stored result ({err}); moved it to "
                    f"{damaged.name} and computing it again", RuntimeWarning, stacklevel=2)
    else:
      if stored["settings"] == settings and stored.get("code") == code["fingerprint"]:
        return stored["result"], stored.get("git_commit") or "unknown"
  result = compute()
  write_json_atomic(path, {"settings": settings, "code": code["fingerprint"],
                           "git_commit": code["git_commit"], "result": result})
  return result, None


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
      result, origin = _cached(
          out / "runs" / f"{name}.json", _run_settings(config), code,
          lambda: convergence_run(config, n=n, d=d, lam=lam, step_fraction=fraction,
                                  causal=causal, seed=seed))
      runs.append(result)
      origins.append(origin)
    for seed in reporter.progress(config.sweep_seeds, desc="sparsity sweep"):
      rows, origin = _cached(out / "sweep" / f"seed{seed}.json", _sweep_settings(config), code,
                             lambda: sparsity_sweep(config, seed=seed))
      sweep.extend(rows)
      origins.append(origin)
  commits = [origin for origin in origins if origin is not None]
  if commits:
    reporter.info(f"resumed: {len(commits)} finished results were reused from {out}")
  reused = {"count": len(commits), "commits": {c: commits.count(c) for c in sorted(set(commits))}}
  return {"config": dataclasses.asdict(config), "runs": runs, "sparsity_sweep": sweep,
          "summary": summarize(runs, sweep),
          "provenance": {"code_fingerprint": code["fingerprint"], "reused_runs": reused}}


def summarize(runs: list[dict], sweep: list[dict]) -> dict:
  """The checks of issue 3 over all runs, and mean attention error per method and sparsity."""
  within = [r for r in runs if r["lr_within_bound"]]
  measured = [r for r in runs if r["pl_mu_measured"] is not None]
  ratios = [r["smoothness_measured"] / r["smoothness_bound"] for r in runs]
  errors = {}
  for row in sweep:
    errors.setdefault(row["method"], {}).setdefault(str(row["sparsity"]), []).append(
        row["attention_error"])
  mean_errors = {m: {s: float(np.mean(v)) for s, v in by_s.items()} for m, by_s in errors.items()}
  return {
      "runs": len(runs),
      "smoothness_bound_holds": sum(r["smoothness_bound"] >= r["smoothness_measured"]
                                    for r in runs),
      "smoothness_measured_over_bound": [float(min(ratios)), float(max(ratios))] if runs else [],
      "pl_holds": sum(r["pl_holds"] for r in runs),
      "pl_xi_needed_over_xi": [float(min(r["pl_xi_needed"] / r["pl_xi"] for r in runs)),
                               float(max(r["pl_xi_needed"] / r["pl_xi"] for r in runs))]
                              if runs else [],
      "runs_with_lr_within_bound": len(within),
      "monotone_when_lr_within_bound": sum(r["monotone"] for r in within),
      "monotone_when_lr_beyond_bound": sum(r["monotone"] for r in runs if not r["lr_within_bound"]),
      "rate_fitted_when_lr_within_bound": sum(r["rate_measured"] is not None for r in within),
      "rate_measured_le_predicted_when_lr_within_bound": sum(
          r["rate_measured"] <= r["rate_predicted"] for r in within
          if r["rate_measured"] is not None),
      "pl_mu_measured_over_mu": [float(min(r["pl_mu_measured"] / r["pl_mu"] for r in measured)),
                                 float(max(r["pl_mu_measured"] / r["pl_mu"] for r in measured))]
                                if measured else [],
      "mean_attention_error": mean_errors,
  }


FIGURES = ("loss_gap.png", "rates.png", "constants.png", "sparsity.png")


def _save(fig, path: Path) -> None:
  from matplotlib import pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot(results: dict, out: Path) -> list[Path]:
  """The four figures of section 6.1, as PNG files in `out`."""
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  runs, sweep = results["runs"], results["sparsity_sweep"]
  paths = [out / name for name in FIGURES]

  # 1. Loss gap on a log scale for one problem per λ, with the slope of the derived rate.
  n, d = max((r["n"], r["d"]) for r in runs)
  problem = [r for r in runs if (r["n"], r["d"], r["seed"], r["causal"]) == (n, d, 0, True)]
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for lam in sorted({r["lam"] for r in problem}):
    r = min((r for r in problem if r["lam"] == lam), key=lambda r: abs(r["step_fraction"] - 1))
    loss = np.asarray(r["loss"])
    steps = np.arange(loss.size) * r["history_stride"]
    gap = loss - r["loss_limit"]
    line, = ax.semilogy(steps[gap > 0], gap[gap > 0],
                        label=f"λ={lam:g}, η={r['step_fraction']:g}/L̂")
    ax.semilogy(steps, gap[0] * r["rate_predicted"] ** steps, "--", color=line.get_color(),
                linewidth=1)
  ax.set(xlabel="step t", ylabel="L(M_t) − L* (L* extrapolated)",
         title=f"Algorithm 1, n={n}, d={d}, causal (dashed: slope of (1−ηλ/2)^t)")
  ax.legend(fontsize=8)
  _save(fig, paths[0])

  # 2. Measured vs predicted rate, as 1 − r on log axes.
  fig, ax = plt.subplots(figsize=(5.2, 4.8))
  for within, marker in ((True, "o"), (False, "x")):
    chosen = [r for r in runs if r["lr_within_bound"] == within
              and r["rate_measured"] is not None and r["rate_measured"] < 1]
    ax.loglog([1 - r["rate_predicted"] for r in chosen], [1 - r["rate_measured"] for r in chosen],
              marker, alpha=0.6, label="η ≤ 1/L_s" if within else "η > 1/L_s")
  limits = np.array([min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1],
                                                                  ax.get_ylim()[1])])
  ax.loglog(limits, limits, "k:", label="measured = predicted")
  ax.set(xlabel="1 − predicted rate (1 − ηλ/2)", ylabel="1 − measured rate",
         title="Linear rate: above the line is faster than derived")
  ax.legend()
  _save(fig, paths[1])

  # 3. L_s measured vs bound; measured PL ratio vs μ = λ/2.
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4))
  left.loglog([r["smoothness_bound"] for r in runs], [r["smoothness_measured"] for r in runs],
              "o", alpha=0.5)
  limits = np.array([min(r["smoothness_measured"] for r in runs),
                     max(r["smoothness_bound"] for r in runs)])
  left.loglog(limits, limits, "k:", label="measured = bound")
  left.set(xlabel="derived bound on L_s", ylabel="measured L_s (max along the run)",
           title="Smoothness")
  left.legend()
  measured = [r for r in runs if r["pl_mu_measured"] is not None]
  right.loglog([r["pl_mu"] for r in measured], [r["pl_mu_measured"] for r in measured], "o",
               alpha=0.5)
  mus = np.array([min(r["pl_mu"] for r in runs), max(r["pl_mu"] for r in runs)])
  right.loglog(mus, mus, "k:", label="measured = λ/2")
  right.set(xlabel="derived μ = λ/2", ylabel="min_t ½‖∇L‖² / (L − min L)",
            title="PL constant along the trajectory")
  right.legend()
  _save(fig, paths[2])

  # 4. Attention error vs sparsity per method (mean over seeds, min-max bars).
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for method in METHODS:
    rows = [row for row in sweep if row["method"] == method]
    levels = sorted({row["sparsity"] for row in rows})
    values = [[row["attention_error"] for row in rows if row["sparsity"] == s] for s in levels]
    mean = np.array([np.mean(v) for v in values])
    ax.errorbar(levels, mean, yerr=[mean - [min(v) for v in values],
                                    [max(v) for v in values] - mean],
                marker="o", capsize=3, label=method)
  n, d = results["config"]["sweep_size"]
  ax.set(xlabel="sparsity (per row)", ylabel="attention error Σ_b ‖f(B∘W) − f(W)‖²_F",
         title=f"Binary masks on synthetic problems, n={n}, d={d}")
  ax.legend()
  _save(fig, paths[3])
  return paths


def report(results: dict, reporter: Reporter) -> None:
  """Prints the summary of the checks and the attention-error table."""
  summary = results["summary"]
  reporter.table(["check", "runs"], [
      ["bound on L_s >= measured L_s", f"{summary['smoothness_bound_holds']}/{summary['runs']}"],
      ["PL inequality holds (μ=λ/2, derived ξ)", f"{summary['pl_holds']}/{summary['runs']}"],
      ["monotone loss when η <= 1/L_s",
       f"{summary['monotone_when_lr_within_bound']}/{summary['runs_with_lr_within_bound']}"],
      ["measured rate <= predicted rate when η <= 1/L_s",
       f"{summary['rate_measured_le_predicted_when_lr_within_bound']}/"
       f"{summary['rate_fitted_when_lr_within_bound']}"],
  ])
  errors = summary["mean_attention_error"]
  levels = sorted({s for by_s in errors.values() for s in by_s}, key=float)
  reporter.info("\nmean attention error of binary masks (lower is better)")
  reporter.table(["sparsity"] + list(errors), [[s] + [errors[m][s] for m in errors]
                                                for s in levels])
