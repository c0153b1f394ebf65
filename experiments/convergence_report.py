"""Figures and tables of the convergence experiments, synthetic and real (presentation only: a
change here changes no stored number)."""

from pathlib import Path

import matplotlib
import numpy as np

from attnprune_jax.reporting import Reporter
from experiments import convergence

FIGURES = ("loss_gap.png", "rates.png", "constants.png", "sparsity.png")


def _pyplot():
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  return plt


def _save(fig, path: Path) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  _pyplot().close(fig)


def _rates_figure(runs: list[dict], path: Path, title: str = "") -> None:
  """Measured vs predicted rate, as 1 − r on log axes."""
  plt = _pyplot()
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
         title=title or "Linear rate: above the line is faster than derived")
  ax.legend()
  _save(fig, path)


def plot_synthetic(results: dict, out: Path) -> list[Path]:
  """The four figures of section 6.1, as PNG files in `out`."""
  plt = _pyplot()

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

  _rates_figure(runs, paths[1])

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
  for method in convergence.MASK_RULES:
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


def plot_real(results: dict, out: Path) -> list[Path]:
  """The four figures of the real-weight experiment, as PNG files in `out`."""
  plt = _pyplot()
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  runs, sweep = results["runs"], results["sparsity_sweep"]
  layers = sorted({r["layer"] for r in runs})
  lams = sorted({r["lam"] for r in runs})
  paths = [out / name for name in FIGURES]
  colors = dict(zip(layers, plt.get_cmap("viridis")(np.linspace(0, 0.9, len(layers)))))

  # 1. Loss gap of head 0 per layer on a log scale, one panel per λ, the smallest step size.
  fig, axes = plt.subplots(1, len(lams), figsize=(4.2 * len(lams), 4.2), squeeze=False)
  fraction = min(r["step_fraction"] for r in runs)
  for ax, lam in zip(axes[0], lams):
    for layer in layers:
      r, = [r for r in runs if (r["layer"], r["head"], r["lam"], r["step_fraction"])
            == (layer, 0, lam, fraction)]
      loss = np.asarray(r["loss"])
      steps = np.arange(loss.size) * r["history_stride"]
      gap = loss - r["loss_limit"]
      ax.semilogy(steps[gap > 0], gap[gap > 0], color=colors[layer], label=f"layer {layer}")
      ax.semilogy(steps, gap[0] * r["rate_predicted"] ** steps, "--", color=colors[layer],
                  linewidth=1)
    ax.set(xlabel="step t", title=f"λ={lam:g}, η={fraction:g}/L̂")
  axes[0, 0].set_ylabel("L(M_t) − L* (head 0; dashed: (1−ηλ/2)^t)")
  axes[0, 0].legend(fontsize=8)
  _save(fig, paths[0])

  # 2. Measured vs predicted rate over every head and setting.
  _rates_figure(runs, paths[1], title=f"Linear rate, {len(runs)} runs on real heads")

  # 3. Measured L_s next to its bound, and the measured PL ratio over μ = λ/2, per layer.
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4))
  jitter = np.linspace(-0.3, 0.3, len(lams))
  for offset, lam in zip(jitter, lams):
    chosen = [r for r in runs if r["lam"] == lam]
    left.semilogy([r["layer"] + offset for r in chosen],
                  [r["smoothness_measured"] for r in chosen], "o", alpha=0.5, label=f"λ={lam:g}")
    left.semilogy([r["layer"] + offset for r in chosen], [r["smoothness_bound"] for r in chosen],
                  "k_", markersize=8)
    measured = [r for r in chosen if r["pl_mu_measured"] is not None]
    right.semilogy([r["layer"] + offset for r in measured],
                   [r["pl_mu_measured"] / r["pl_mu"] for r in measured], "o", alpha=0.5,
                   label=f"λ={lam:g}")
  right.axhline(1.0, color="k", linestyle=":", label="= λ/2 (derived μ)")
  left.set(xlabel="layer", ylabel="L_s (dots: measured per head; bars: derived bound)",
           title="Smoothness per layer")
  right.set(xlabel="layer", ylabel="min_t ½‖∇L‖² / (L − min L), over λ/2",
            title="PL ratio along the trajectory")
  left.legend(fontsize=8)
  right.legend(fontsize=8)
  _save(fig, paths[2])

  # 4. Held-out attention error per layer (mean over heads), one panel per sparsity.
  levels = sorted({row["sparsity"] for row in sweep})
  fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 4.2), squeeze=False)
  for ax, level in zip(axes[0], levels):
    for method in convergence.MASK_RULES:
      means = [np.mean([row["attention_error"] for row in sweep if (
          row["layer"], row["method"], row["sparsity"]) == (layer, method, level)])
               for layer in layers]
      ax.semilogy(layers, means, "o-", label=method)
    ax.set(xlabel="layer", title=f"sparsity {level:g} per row")
  axes[0, 0].set_ylabel("held-out Σ_b‖f(B∘W_h) − f(W_h)‖²_F, mean over heads")
  axes[0, 0].legend(fontsize=8)
  _save(fig, paths[3])
  return paths


def report(results: dict, reporter: Reporter) -> None:
  """Prints the checks of the theory and the mean attention error per method and sparsity."""
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
  below = summary["below_wanda_merged"]
  reporter.info("\nproblems where a mask beats wanda-merged (scored / on the calibration inputs)")
  reporter.table(["sparsity"] + list(below),
                 [[s] + [f"{below[m][s][0]}/{below[m][s][2]} ({below[m][s][1]})" for m in below]
                  for s in levels])
