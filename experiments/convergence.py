"""Algorithm 1 on merged problems, measured against the theory derived here (docs/theory.md): the
one experiment core of the synthetic (section 6.1) and the real-weight experiments.

A problem is a merged weight w (d, d), or a stack of heads (h, d, d) that share the inputs x
(b, n, d): the synthetic experiment solves one head at a time, the real one every query head of
a layer in one vmapped `solve_mask`, each head at its own step size. Both record the same
quantities per head and run, and summarize them with `summarize`.
"""

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import attnprune_jax as ap
from attnprune_jax import theory
from attnprune_jax.masks import merged_activation_score
from attnprune_jax.solver import solve_mask_progressive

# The binary-mask rules compared on merged problems (d × d per head): scores of the merged form,
# not the model pruning methods of `attnprune_jax.methods`.
MASK_RULES = ("magnitude", "wanda-merged", "attn", "attn-progressive")


class Rounding(NamedTuple):
  """Changes of the loss, relative to |L(M₀)|, below which they are rounding (our choice)."""
  rise: float  # a larger rise from one step to the next breaks monotonicity
  decrease: float  # decreases above this enter the fitted rate
  gap: float  # L − min L above this enters the measured PL ratio


ROUNDING = {np.dtype(np.float64): Rounding(rise=1e-12, decrease=1e-11, gap=1e-9),
            np.dtype(np.float32): Rounding(rise=1e-6, decrease=1e-6, gap=1e-5)}


def _heads(w) -> jax.Array:
  """w as a stack of heads (h, d, d)."""
  return w if w.ndim == 3 else w[None]


def _per_head(w, values):
  """`values` (h, ...) as `solve_mask` takes them for w: per head, or the one head's."""
  return values if w.ndim == 3 else values[0]


def smoothness_at(masks, w, x, *, lam, key, causal: bool, iters: int) -> np.ndarray:
  """‖∇²L(M)‖₂ of each head at its mask (`theory.smoothness_measured`), as (h,) float64."""
  return np.atleast_1d(np.asarray(theory.smoothness_measured(
      _per_head(w, masks), w, x, lam=lam, key=key, causal=causal, iters=iters), np.float64))


def convergence_runs(w, x, *, lam: float, step_fraction: float, causal: bool, steps: int,
                     segments: int, power_iters: int, history_points: int,
                     key: jax.Array) -> list[dict]:
  """Algorithm 1 from M₀ = 1 on each head at η = step_fraction / L̂ (L̂ the Hessian norm of its
  loss at M₀), with the measured and derived constants; one record per head.

  The run is solved in `segments` pieces; the Hessian norm is measured at the start of each and
  at the end, and the largest value is the head's measured L_s.

  Args:
    w: merged weight (d, d), or heads (h, d, d) sharing x.
    x: (b, n, d) inputs, in w's dtype (float64 for rates far below float32 rounding).
    lam, step_fraction, causal: the setting.
    steps: gradient steps in all, in `segments` pieces of (nearly) equal size.
    power_iters: power iterations per Hessian norm; history_points: at most this many points of
      the loss and gradient-norm histories are kept (every `history_stride`-th step).
    key: PRNG key of the power iterations' start vectors.
  """
  heads = _heads(w)
  rounding = ROUNDING[np.dtype(heads.dtype)]
  sizes = [steps // segments + (i < steps % segments) for i in range(segments)]
  measure = lambda masks: smoothness_at(masks, w, x, lam=lam, key=key, causal=causal,
                                        iters=power_iters)
  masks = jnp.ones_like(heads)
  smoothness = [measure(masks)]
  lr = step_fraction / smoothness[0]
  losses, grad_norms = [], []
  for size in sizes:
    with warnings.catch_warnings():
      # Step sizes beyond 1/L_s are part of the grid; monotonicity is recorded, not warned.
      warnings.simplefilter("ignore", RuntimeWarning)
      solution = ap.solve_mask(w, x, lam=lam, steps=size, lr=_per_head(w, lr),
                               causal=causal, init=_per_head(w, masks))
    masks = _heads(solution.mask)
    losses.append(np.asarray(solution.loss).reshape(len(heads), -1))
    grad_norms.append(np.asarray(solution.grad_norm).reshape(len(heads), -1))
    smoothness.append(measure(masks))
  loss, grad_norm = np.concatenate(losses, axis=1), np.concatenate(grad_norms, axis=1)
  smoothness = np.stack(smoothness, axis=1)
  return [_run_record(head, x, loss=loss[i], grad_norm=grad_norm[i], smoothness=smoothness[i],
                      lam=lam, lr=float(lr[i]), step_fraction=step_fraction, causal=causal,
                      history_points=history_points, rounding=rounding)
          for i, head in enumerate(heads)]


def _run_record(w, x, *, loss, grad_norm, smoothness, lam, lr, step_fraction, causal,
                history_points, rounding: Rounding) -> dict:
  """The measured and derived quantities of one head's run."""
  pl = theory.pl_constants(w, x, lam=lam, causal=causal)
  smoothness_measured = float(max(smoothness))
  xi_needed = theory.pl_xi_needed(loss, grad_norm, mu=pl.mu)
  gap = loss - loss.min()
  positive = gap > rounding.gap * abs(loss[0])
  stride = max(1, -(-loss.size // history_points))
  rate = theory.measured_rate(loss, noise=rounding.decrease)
  # L* by summing the geometric tail of the decreases at the measured rate.
  tail = (loss[-2] - loss[-1]) * rate / (1 - rate) if 0 < rate < 1 else 0.0
  return {
      "lam": lam, "lr": lr, "step_fraction": step_fraction, "causal": causal,
      "history_stride": stride, "loss": loss[::stride].tolist(),
      "grad_norm": grad_norm[::stride].tolist(),
      "smoothness_measured": smoothness_measured, "smoothness_at_start": float(smoothness[0]),
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
      "monotone": bool(np.all(np.diff(loss) <= rounding.rise * abs(loss[0]))),
  }


def sparsity_comparison(w, x, heldout, *, sparsities, attn_lam: float, attn_steps: int,
                        progressive_lam: float, progressive_rounds: int, progressive_steps: int,
                        power_iters: int, key: jax.Array) -> list[dict]:
  """Attention error on `heldout` of binary masks per row, for every method and sparsity.

  `attn` is Algorithm 1 (λ = attn_lam, attn_steps steps at η = 1/L̂) followed by keeping the top
  |M| per row: the learned mask read literally. (Scoring |M∘W|·‖X_i‖‖X_j‖ instead ranks like
  `wanda-merged`, since M stays close to 1.) `attn-progressive` is `solve_mask_progressive` at
  λ = progressive_lam, η = 1/L̂ (L̂ by `power_iters` power iterations at M₀). Causal attention.

  Args:
    w: (d, d) or heads (h, d, d); x: (b, n, d) calibration inputs the methods see; heldout:
      (b', n', d) inputs that score the masks (x itself on synthetic problems).
  Returns:
    rows {"head", "method", "sparsity", "achieved_sparsity", "attention_error" (on heldout),
    "calibration_error" (on x)}, sparsity by sparsity, head by head, in the order of MASK_RULES.
  """
  heads = _heads(w)
  ones = jnp.ones_like(heads)
  attn_lr = 1.0 / smoothness_at(ones, w, x, lam=attn_lam, key=key, causal=True,
                               iters=power_iters)
  solved = _heads(ap.solve_mask(w, x, lam=attn_lam, steps=attn_steps,
                                lr=_per_head(w, attn_lr)).mask)
  progressive_lr = 1.0 / smoothness_at(ones, w, x, lam=progressive_lam, key=key, causal=True,
                                       iters=power_iters)
  scores = [{"magnitude": jnp.abs(head), "wanda-merged": merged_activation_score(head, x),
             "attn": jnp.abs(solved[h])} for h, head in enumerate(heads)]
  rows = []
  for sparsity in sparsities:
    for h, head in enumerate(heads):
      keeps = {method: ap.binarize(score, sparsity) for method, score in scores[h].items()}
      keeps["attn-progressive"] = solve_mask_progressive(
          head, x, sparsity=sparsity, lam=progressive_lam, lr=progressive_lr[h],
          rounds=progressive_rounds, steps_per_round=progressive_steps).keep
      for method in MASK_RULES:
        keep = keeps[method].astype(head.dtype)
        error = float(ap.attention_error(keep, head, heldout))
        rows.append({"head": h, "method": method, "sparsity": sparsity,
                     "achieved_sparsity": float(1.0 - keep.mean()), "attention_error": error,
                     "calibration_error": error if heldout is x else
                                          float(ap.attention_error(keep, head, x))})
  return rows


def value_range(values) -> list[float]:
  """[min, max] of `values`, or [] if there are none."""
  return [float(min(values)), float(max(values))] if values else []


def summarize(runs: list[dict], sweep: list[dict]) -> dict:
  """The checks of the theory over all runs, and mean attention error per method and sparsity."""
  within = [r for r in runs if r["lr_within_bound"]]
  measured = [r for r in runs if r["pl_mu_measured"] is not None]
  return {
      "runs": len(runs),
      "smoothness_bound_holds": sum(r["smoothness_bound"] >= r["smoothness_measured"]
                                    for r in runs),
      "smoothness_measured_over_bound": value_range(
          [r["smoothness_measured"] / r["smoothness_bound"] for r in runs]),
      "pl_holds": sum(r["pl_holds"] for r in runs),
      "pl_xi_needed_over_xi": value_range([r["pl_xi_needed"] / r["pl_xi"] for r in runs]),
      "runs_with_lr_within_bound": len(within),
      "monotone_when_lr_within_bound": sum(r["monotone"] for r in within),
      "monotone_when_lr_beyond_bound": sum(r["monotone"] for r in runs if not r["lr_within_bound"]),
      "rate_fitted_when_lr_within_bound": sum(r["rate_measured"] is not None for r in within),
      "rate_measured_le_predicted_when_lr_within_bound": sum(
          r["rate_measured"] <= r["rate_predicted"] for r in within
          if r["rate_measured"] is not None),
      "pl_mu_measured_over_mu": value_range([r["pl_mu_measured"] / r["pl_mu"] for r in measured]),
      "mean_attention_error": _means(sweep, "attention_error"),
      "mean_calibration_error": _means(sweep, "calibration_error"),
      "below_wanda_merged": _below_wanda_merged(sweep),
  }


def _below_wanda_merged(sweep: list[dict]) -> dict:
  """{method: {sparsity: [k held-out, k calibration, N]}}: in how many of the N problems (heads
  or seeds) a method's mask has a lower error than `wanda-merged`'s."""
  problems = {}
  for row in sweep:
    problem = tuple(row.get(k) for k in ("layer", "head", "seed"))
    problems.setdefault(str(row["sparsity"]), {}).setdefault(problem, {})[row["method"]] = row
  counts = {}
  for level, by_problem in problems.items():
    for rows in by_problem.values():
      base = rows["wanda-merged"]
      for method, row in rows.items():
        if method != "wanda-merged":
          k = counts.setdefault(method, {}).setdefault(level, [0, 0, 0])
          k[0] += row["attention_error"] < base["attention_error"]
          k[1] += row["calibration_error"] < base["calibration_error"]
          k[2] += 1
  return counts


def _means(sweep: list[dict], field: str) -> dict:
  """{method: {sparsity: mean of `field`}} over the rows of a sparsity comparison."""
  values = {}
  for row in sweep:
    values.setdefault(row["method"], {}).setdefault(str(row["sparsity"]), []).append(row[field])
  return {m: {s: float(np.mean(v)) for s, v in by_s.items()} for m, by_s in values.items()}
