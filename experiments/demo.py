"""The demo: Algorithm 1 on one small synthetic head, then binary masks at a few sparsities.

Every setting here is our choice (the paper's η, T, λ and binarization rule are not known).
The step size starts at `step_fraction / L̂`, with L̂ the smoothness constant measured at M₀ = 1.
L̂ is local: where the curvature grows along the path (large logits), that step makes the loss
rise. The rule is therefore made safe by backtracking: while the loss rises at some step, or
diverges, the step size is halved and the run repeated, at most `MAX_HALVINGS` times; the
halvings are reported. A loss still rising after them is a `DivergenceError`.
"""

import dataclasses
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import attnprune_jax as ap
from attnprune_jax.errors import DivergenceError
from attnprune_jax.masks import merged_activation_score
from attnprune_jax.reporting import Reporter
from attnprune_jax.synthetic import synthetic_problem
from attnprune_jax.theory import smoothness_measured
from experiments.configs import DemoConfig


MAX_HALVINGS = 20
RISE_TOLERANCE = 1e-4  # a step may raise the loss by this fraction of L(M0) (float32 rounding)


def solve_with_backtracking(w, x, config: DemoConfig, smoothness: float):
  """Algorithm 1 at η = step_fraction / L̂, halving η while the loss rises at some step (the
  last update included) or diverges.

  Returns:
    (solution, lr, halvings, L(M_T)).
  """
  lr = config.step_fraction / smoothness
  for halvings in range(MAX_HALVINGS + 1):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # a rise is handled here
      try:
        solution = ap.solve_mask(w, x, lam=config.lam, steps=config.steps, lr=lr,
                                 causal=config.causal)
      except DivergenceError:
        solution = None
    if solution is not None:
      final = float(ap.pruning_loss(solution.mask, w, x, lam=config.lam, causal=config.causal))
      loss = np.append(np.asarray(solution.loss, np.float64), final)
      if np.all(np.diff(loss) <= RISE_TOLERANCE * loss[0]):
        return solution, lr, halvings, final
    if halvings < MAX_HALVINGS:
      lr /= 2
  raise DivergenceError(
      f"the loss still rises or diverges after {MAX_HALVINGS} halvings of the step size "
      f"(--step-fraction {config.step_fraction:g} of 1/L_s, L_s = {smoothness:.4g} measured at "
      f"M0; last lr = {lr:.4g}); use a smaller --step-fraction")


def mask_scores(w, x, mask) -> dict[str, jax.Array]:
  """Scores ranked by `binarize`: weight-only, activation-aware, and from the solved mask.

  With ‖X_i‖ the norm of input channel i over all tokens, "wanda-merged" is the merged-form
  analogue of Wanda's score, |W_ij|·‖X_i‖·‖X_j‖ (W acts on X from both sides); it is not
  `baselines.wanda`, which scores an (out, in) projection.
  """
  return {
      "magnitude": jnp.abs(w),
      "wanda-merged": merged_activation_score(w, x),
      "attn |M|": jnp.abs(mask),
      "attn |M∘W|·‖x‖‖x‖": merged_activation_score(mask * w, x),
  }


def run(config: DemoConfig, reporter: Reporter) -> dict:
  """Solves the mask, binarizes it and the baselines' scores, returns losses and errors."""
  start = time.perf_counter()
  key_problem, key_power = jax.random.split(jax.random.key(config.seed))
  w, x = synthetic_problem(key_problem, n=config.n, d=config.d, batch=config.batch,
                           rank=config.rank)
  ones = jnp.ones_like(w)
  smoothness = float(smoothness_measured(ones, w, x, lam=config.lam, key=key_power,
                                         causal=config.causal))
  solution, lr, halvings, final_loss = solve_with_backtracking(w, x, config, smoothness)
  halved = f", halved {halvings} times because the loss rose" if halvings else ""
  reporter.info(f"Algorithm 1: {config.steps} steps, lam={config.lam:g}, "
                f"lr={lr:.4g} (= {config.step_fraction:g}/L_s{halved}; L_s measured at M0: "
                f"{smoothness:.4g})")
  scores = mask_scores(w, x, solution.mask)
  pruned = []
  for sparsity in reporter.progress(config.sparsities, desc="binarize"):
    for method, score in scores.items():
      keep = ap.binarize(score, sparsity, group="row")
      pruned.append({
          "method": method,
          "sparsity": sparsity,
          "achieved_sparsity": float(1.0 - keep.mean()),
          "attention_error": float(ap.attention_error(keep.astype(w.dtype), w, x,
                                                      causal=config.causal)),
      })
  return {
      "config": dataclasses.asdict(config),
      "lr": lr,
      "lr_halvings": halvings,
      "smoothness_at_start": smoothness,
      "loss_before": float(solution.loss[0]),
      "loss_after": final_loss,
      "grad_norm_before": float(solution.grad_norm[0]),
      "grad_norm_after": float(solution.grad_norm[-1]),
      "pruned": pruned,
      "wall_time_s": time.perf_counter() - start,
  }


def report(results: dict, reporter: Reporter) -> None:
  """Prints the loss before/after and the attention error of each binary mask."""
  reporter.table(["", "L(M)", "‖∇L(M)‖"], [
      ["M0 = 1", results["loss_before"], results["grad_norm_before"]],
      [f"M_T (T={results['config']['steps']})", results["loss_after"],
       results["grad_norm_after"]],
  ])
  reporter.info("")
  methods = list(dict.fromkeys(row["method"] for row in results["pruned"]))
  sparsities = list(dict.fromkeys(row["sparsity"] for row in results["pruned"]))
  by_key = {(row["method"], row["sparsity"]): row for row in results["pruned"]}
  reporter.info("attention error Σ_b ‖f(B∘W) − f(W)‖²_F of binary masks B (lower is better)")
  reporter.table(
      ["sparsity", "achieved"] + methods,
      [[s, by_key[(methods[0], s)]["achieved_sparsity"]]
       + [by_key[(m, s)]["attention_error"] for m in methods] for s in sparsities])
