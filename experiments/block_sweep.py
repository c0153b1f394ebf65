"""The small sweep that chooses the whole-block methods' solver settings (`BlockSolverConfig`).

Calibration text only (Emma): a few layers of the real model are pruned one at a time on the
dense model's inputs of the calibration windows, and measured on a tuning slice of Emma windows
after both the calibration windows and the held-out windows that the tables report, never on
the evaluation text. The measure is the block's relative output error on the tuning slice,
‖B_pruned(h) − B(h)‖² / ‖B(h) − h‖² (B the decoder block, h its dense input): the share of the
block's update that pruning loses. Each variant changes one setting of the registered default;
Wanda and SparseGPT on every linear of the same block are the references. (On dense inputs the
"teacher" and "local" targets coincide: that choice needs whole-model rows.)

    .venv/bin/python -m experiments.block_sweep --out results/whole_model_sweep.json
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from attnprune_jax import data, methods, models, numerics
from attnprune_jax.baselines import input_stats
from attnprune_jax.models.llama import (LINEAR_INPUTS, decoder_layer, embed, layer_weights,
                                        linear_inputs)
from attnprune_jax.patterns import parse_pattern
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import provenance, result_document, write_json_atomic
from attnprune_jax.settings import TARGETS, DataConfig, quick_layers

TUNING_WINDOWS = 4  # Emma windows after the calibration and held-out ones


def variants(method: str) -> dict:
  """The configurations tried: the registered default and one-setting changes of it."""
  base = dataclasses.replace(methods.get(method).solver, target="local")  # = teacher here
  changes = {"default": {}, "lr 1e-3": {"lr": 1e-3}, "lr 1e-2": {"lr": 1e-2},
             "attention weight 0": {"attention_weight": 0.0},
             "attention weight 4": {"attention_weight": 4.0},
             "steps/round 24": {"steps_per_round": 24}}
  if method == "attn-block-reweight":
    changes |= {"reweight steps 100": {"reweight_steps": 100}}
  return {name: dataclasses.replace(base, **change) for name, change in changes.items()}


_run_layer = jax.jit(decoder_layer, static_argnames="config")


def block_error(config, layer: dict, new: dict, hidden) -> float:
  """‖B_new(h) − B(h)‖² / ‖B(h) − h‖² over the windows of `hidden`."""
  dense = _run_layer(hidden, layer, config)[0]
  pruned = _run_layer(hidden, layer | new, config)[0]
  return float(jnp.sum((pruned - dense)**2) / jnp.sum((dense - hidden)**2))


def baseline_weights(method: str, config, layer: dict, hidden, sparsity: str) -> dict:
  """Every linear of the block pruned by a linear method from its dense-block inputs."""
  value, n_m = parse_pattern(sparsity)
  inputs = jax.jit(linear_inputs, static_argnames="config")(hidden, layer, config)
  method = methods.get(method, "linear")
  new = {}
  for target in TARGETS["all"]:
    x = inputs[LINEAR_INPUTS[target]]
    stats = input_stats(x.reshape(-1, x.shape[-1]), gram=method.needs_gram)
    new[target] = method.prune(layer[target], stats, value, n_m)[0].astype(layer[target].dtype)
  return new


def sweep_windows(model) -> dict:
  """The calibration windows the methods see and the tuning slice that measures them (Emma
  windows after the calibration and the held-out ones), as token arrays (b, t)."""
  windows = DataConfig()
  tokens = data.calibration_windows(
      model.tokenizer, count=windows.calib_seqs + windows.heldout_seqs + TUNING_WINDOWS,
      ctx=windows.calib_len)
  return {"calibration": tokens[:windows.calib_seqs],
          "tuning": tokens[windows.calib_seqs + windows.heldout_seqs:]}


def dense_inputs(model, index: int) -> dict:
  """The dense model's residual stream entering block `index` on the sweep's windows."""
  dense, config = model.weights(), model.config
  hidden = {name: embed(dense, tokens, config) for name, tokens in sweep_windows(model).items()}
  for earlier in range(index):
    layer = layer_weights(dense, earlier)
    hidden = {name: _run_layer(h, layer, config)[0] for name, h in hidden.items()}
  return hidden


def row_error(config, layer: dict, hidden: dict, method: str, sparsity: str,
              solver=None) -> float:
  """The tuning slice's block error of `method` (a linear baseline with solver None, else a
  block method with `solver`) pruning the block from its calibration inputs."""
  if solver is None:
    new = baseline_weights(method, config, layer, hidden["calibration"], sparsity)
  else:
    value, n_m = parse_pattern(sparsity)
    new = methods.get(method).prune(layer, hidden["calibration"], targets=TARGETS["all"],
                                    sparsity=value, n_m=n_m, config=config, solver=solver,
                                    teacher=None).weights
  return block_error(config, layer, new, hidden["tuning"])


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="smollm2")
  parser.add_argument("--sparsity", default="0.6", help="a fraction or N:M (default 0.6)")
  parser.add_argument("--methods", nargs="+", default=["attn-block-reweight", "attn-block"])
  parser.add_argument("--out", type=Path, default=Path("results/whole_model_sweep.json"))
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)
  reporter = Reporter(quiet=args.quiet)
  model = models.load(args.model)
  config = model.config
  layers = quick_layers(config.num_layers)
  done = []
  if args.out.is_file():
    stored = json.loads(args.out.read_text())
    if stored.get("numerics") != numerics.PRUNING:
      raise SystemExit(f"{args.out} holds rows of another numerics version "
                       f"({stored.get('numerics')}, now {numerics.PRUNING}): move it away")
    done = stored["rows"]
  key = lambda row: (row["layer"], row["sparsity"], row["method"], row["variant"])
  finished = {key(row) for row in done}
  rows, start = list(done), time.perf_counter()
  dense = model.weights()
  hidden = {name: embed(dense, tokens, config) for name, tokens in sweep_windows(model).items()}
  todo = [("wanda", "", None), ("sparsegpt", "", None)]
  todo += [(m, name, solver) for m in args.methods for name, solver in variants(m).items()]
  for index in range(max(layers) + 1):
    layer = layer_weights(dense, index)
    if index in layers:
      for method, variant, solver in todo:
        if (index, args.sparsity, method, variant) in finished:
          continue
        tic = time.perf_counter()
        row = {"layer": index, "sparsity": args.sparsity, "method": method, "variant": variant,
               "settings": None if solver is None else dataclasses.asdict(solver),
               "block_error": row_error(config, layer, hidden, method, args.sparsity, solver),
               "time_s": time.perf_counter() - tic}
        rows.append(row)
        reporter.info(f"layer {index} {method} {variant or ''}: {row['block_error']:.4f} "
                      f"({row['time_s']:.0f} s)")
        write_json_atomic(args.out, result_document(
            "whole-model-sweep", {"rows": rows, "numerics": numerics.PRUNING},
            provenance(seed=None, settings=vars(args) | {"out": str(args.out), "layers": layers},
                       wall_time_s=time.perf_counter() - start)))
    hidden = {name: _run_layer(h, layer, config)[0] for name, h in hidden.items()}

if __name__ == "__main__":
  main()
