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

import jax
import jax.numpy as jnp
import numpy as np

from attnprune_jax import methods, models, runs
from attnprune_jax.baselines import input_stats
from attnprune_jax.layer_masks import solve_layer
from attnprune_jax.models.llama import forward, layer_weights
from attnprune_jax.objective import layer_attention_error
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import provenance, result_document, write_json_atomic
from attnprune_jax.settings import DataConfig

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


def run(methods, sparsities, layers, reporter: Reporter) -> list[dict]:
  """Rows {method, variant, sparsity, pattern, layer, heldout_error, wanda/sparsegpt error,
  time_s}."""
  model = models.load("smollm2")
  config = model.config
  # The same calibration and held-out Emma windows as a default `reproduce` row.
  token_windows = runs.token_windows(model, DataConfig())
  calibration = len(token_windows["calibration"])
  tokens = np.concatenate([token_windows["calibration"], token_windows["heldout"]])
  _, captured = forward(model.weights(), jnp.asarray(tokens), config,
                        return_attention_inputs=True)
  inputs = captured["attention_inputs"]
  layout = dict(num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                rope=config.rope)
  rows = []
  for layer in layers:
    x, heldout = inputs[layer, :calibration], inputs[layer, calibration:]
    weights = layer_weights(model.weights(), layer)
    q, k = weights["q_proj"], weights["k_proj"]
    stats = input_stats(x.reshape(-1, x.shape[-1]))

    def error(new_q, new_k, q=q, k=k, heldout=heldout):
      return float(layer_attention_error(new_q, new_k, q, k, heldout, head_dim=config.head_dim,
                                         rope=config.rope).mean())

    for sparsity in sparsities:
      n_m = (2, 4) if sparsity == "2:4" else None
      s = 0.5 if n_m else float(sparsity)
      reference = {name: error(methods.get(name).prune(q, stats, s, n_m)[0],
                               methods.get(name).prune(k, stats, s, n_m)[0])
                   for name in ("wanda", "sparsegpt")}
      for method in methods:
        for name, solver_config in reporter.progress(variants(method).items(),
                                                     desc=f"layer {layer} {sparsity} {method}"):
          start = time.perf_counter()
          result = solve_layer(q, k, x, method=method, sparsity=s, n_m=n_m,
                               config=solver_config, **layout)
          jax.block_until_ready(result.q_proj)
          rows.append({"method": method, "variant": name, "sparsity": str(sparsity),
                       "layer": layer, "heldout_error": error(result.q_proj, result.k_proj),
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
      "qk-sweep", {"rows": rows, "summary": [dict(zip(header, row)) for row in summary]},
      provenance(seed=None, settings=vars(args), wall_time_s=time.perf_counter() - start)))


if __name__ == "__main__":
  main()
