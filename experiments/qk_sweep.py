"""The small sweep that chose the attention-aware methods' solver settings (registered with each
method, `methods.REGISTRY`).

It looks only at calibration text (Emma): solves a few layers of the real model on calibration
windows and measures the attention error on held-out Emma windows that follow them, never the
evaluation text. Layers are solved one at a time on dense inputs (no re-propagation), to keep
the sweep small. Each variant changes one setting of a base configuration.

    .venv/bin/python -m experiments.qk_sweep --out out/qk_sweep   # writes results.json, a table
"""

import argparse
import dataclasses
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from attnprune_jax import methods, models, numerics, runs
from attnprune_jax.baselines import input_stats
from attnprune_jax.layer_masks import solve_layer
from attnprune_jax.models.llama import LAYER_WEIGHTS, forward, layer_weights
from attnprune_jax.objective import layer_attention_error
from attnprune_jax.patterns import parse_pattern
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import provenance, result_document, write_json_atomic
from attnprune_jax.settings import DataConfig
from attnprune_jax.solver_config import MaskSolverConfig

LAYERS = (5, 15, 25)


def variants(method: str) -> dict:
  """The configurations tried for one method: the default and one-setting changes of it."""
  base = methods.get(method).solver
  changes = {"default": {}, "lr 3e-2": {"lr": 3e-2}, "lam 1e-3": {"lam": 1e-3},
             "lam 1e-2": {"lam": 1e-2}, "lam 0": {"lam": 0.0},
             "windows/step 4": {"windows_per_step": 4}, "steps/round 6": {"steps_per_round": 6},
             "rounds 4": {"rounds": 4}}
  if method == "attn":
    changes = {"default": {}, "lam 1e-4": {"lam": 1e-4}, "lam 1e-3": {"lam": 1e-3},
               "lr 3e-2": {"lr": 3e-2}, "steps 50": {"steps": 50}}
  if method == "attn-reweight":
    changes = {"default": {}, "reweight steps 10": {"reweight_steps": 10},
               "reweight steps 100": {"reweight_steps": 100}}
  return {name: dataclasses.replace(base, **change) for name, change in changes.items()}


def layer_problems(model, layers) -> dict[int, dict]:
  """Each layer's q/k weights and its calibration and held-out attention inputs (the same Emma
  windows as a default `reproduce` row), from one forward of the dense model's layers up to the
  last one asked for."""
  windows = runs.token_windows(model, DataConfig())
  calibration = len(windows["calibration"])
  tokens = np.concatenate([windows["calibration"], windows["heldout"]])
  last = max(layers) + 1
  weights = {name: value[:last] if name in LAYER_WEIGHTS else value
             for name, value in model.weights().items()}
  _, captured = forward(weights, jnp.asarray(tokens), model.config,
                        return_attention_inputs=True)
  inputs = captured["attention_inputs"]
  problems = {}
  for layer in layers:
    weights = layer_weights(model.weights(), layer)
    problems[layer] = {"q": weights["q_proj"], "k": weights["k_proj"],
                       "x": inputs[layer, :calibration], "heldout": inputs[layer, calibration:]}
  return problems


def heldout_error(model, problem: dict, new_q, new_k) -> float:
  """The held-out attention error of new q/k weights, mean over windows."""
  config = model.config
  return float(layer_attention_error(new_q, new_k, problem["q"], problem["k"],
                                     problem["heldout"], head_dim=config.head_dim,
                                     rope=config.rope).mean())


def baseline_errors(model, problem: dict, sparsity: str) -> dict[str, float]:
  """{"wanda", "sparsegpt"}: the held-out errors of the two baselines at `sparsity`."""
  value, n_m = parse_pattern(sparsity)
  x = problem["x"]
  stats = input_stats(x.reshape(-1, x.shape[-1]))
  return {name: heldout_error(model, problem,
                              methods.get(name).prune(problem["q"], stats, value, n_m)[0],
                              methods.get(name).prune(problem["k"], stats, value, n_m)[0])
          for name in ("wanda", "sparsegpt")}


def solved_error(model, problem: dict, method: str, sparsity: str,
                 solver: MaskSolverConfig) -> float:
  """The held-out error of an attention-aware method with `solver` settings at `sparsity`."""
  value, n_m = parse_pattern(sparsity)
  config = model.config
  result = solve_layer(problem["q"], problem["k"], problem["x"], method=method, sparsity=value,
                       n_m=n_m, config=solver, num_kv_heads=config.num_kv_heads,
                       head_dim=config.head_dim, rope=config.rope)
  return heldout_error(model, problem, result.q_proj, result.k_proj)


def run(method_names, sparsities, layers, reporter: Reporter) -> list[dict]:
  """Rows {method, variant, solver (its settings), sparsity, layer, heldout_error,
  wanda_error, sparsegpt_error, time_s}."""
  model = models.load("smollm2")
  problems = layer_problems(model, layers)
  rows = []
  for layer, problem in problems.items():
    for sparsity in sparsities:
      reference = baseline_errors(model, problem, sparsity)
      for method in method_names:
        for name, solver in reporter.progress(variants(method).items(),
                                              desc=f"layer {layer} {sparsity} {method}"):
          start = time.perf_counter()
          error = solved_error(model, problem, method, sparsity, solver)
          rows.append({"method": method, "variant": name, "solver": dataclasses.asdict(solver),
                       "sparsity": str(sparsity), "layer": layer, "heldout_error": error,
                       "wanda_error": reference["wanda"],
                       "sparsegpt_error": reference["sparsegpt"],
                       "time_s": time.perf_counter() - start})
  return rows


def summarize(rows: list[dict]) -> list[list]:
  """Per (method, sparsity, variant): geometric mean over layers of the error ratio against
  Wanda (binary methods) or SparseGPT (re-weighting), and the mean time per layer."""
  table = {}
  for row in rows:
    reference = row["sparsegpt_error"] if row["method"] == "attn-reweight" else row["wanda_error"]
    table.setdefault((row["method"], row["sparsity"], row["variant"]), []).append(
        (row["heldout_error"] / reference, row["time_s"]))
  return [[method, sparsity, variant, float(np.exp(np.mean(np.log([r for r, _ in values])))),
           float(np.mean([t for _, t in values]))]
          for (method, sparsity, variant), values in table.items()]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--methods", nargs="+", default=["attn-progressive"])
  parser.add_argument("--sparsities", nargs="+", default=["0.7"])
  parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args()
  reporter = Reporter(quiet=args.quiet)
  start = time.perf_counter()
  rows = run(args.methods, args.sparsities, args.layers, reporter)
  summary = summarize(rows)
  header = ["method", "sparsity", "variant", "error / reference", "s per layer"]
  reporter.table(header, summary)
  write_json_atomic(Path(args.out) / "results.json", result_document(
      "qk-sweep", {"rows": rows, "summary": [dict(zip(header, row)) for row in summary],
                   "numerics": numerics.PRUNING},
      provenance(seed=None, settings=vars(args), wall_time_s=time.perf_counter() - start)))


if __name__ == "__main__":
  main()
