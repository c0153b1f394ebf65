"""Whole-model pruning time per method on SmolLM2-135M (q/k, or every linear), measured in one run.

Runs `pipeline.prune_model` (layer-sequential, with re-propagation and the held-out attention
errors, no perplexity) for each method at 50 % unstructured on the default calibration data of
`attnprune prune` (8 Emma windows × 512 tokens, 4 held-out), and prints seconds, seconds per
pruned layer and the ratio to magnitude pruning's time in the same run (magnitude's time is
almost all re-propagation, so the ratio says what a method adds on top of it). The first method
also pays the compilation of the shared layer functions.

  python benchmarks/prune_time.py [--layers 0-29] [--methods magnitude wanda ...] [--devices 1]
                                  [--targets qk|attention|all] [--rest wanda]
"""

import argparse
import time

import jax

from attnprune_jax import methods, models
from attnprune_jax.pipeline import prune_model
from attnprune_jax.runs import token_windows as windows
from attnprune_jax.settings import TARGETS, DataConfig, PruneSettings


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", default=None, help="first-last layer, e.g. 0-5 (default all)")
  parser.add_argument("--methods", nargs="+", default=list(methods.names()),
                      choices=methods.names())
  parser.add_argument("--sparsity", type=float, default=0.5)
  parser.add_argument("--targets", choices=tuple(TARGETS), default="qk")
  parser.add_argument("--rest", choices=methods.names("linear"),
                      help="beyond qk: the linear method for the other targets of a q/k method")
  parser.add_argument("--devices", type=int, default=1,
                      help="devices sharing each layer's attention-aware solve")
  args = parser.parse_args()
  if not 1 <= args.devices <= len(jax.devices()):
    parser.error(f"--devices must be in [1, {len(jax.devices())}], got {args.devices}")
  model = models.load("smollm2")
  num_layers = model.config.num_layers
  first, last = (0, num_layers - 1) if args.layers is None else map(int, args.layers.split("-"))
  layers = tuple(range(first, last + 1))
  token_windows = windows(model, DataConfig())
  devices = None if args.devices == 1 else jax.devices()[:args.devices]
  print(f"SmolLM2-135M, {args.targets} of layers {first}-{last} ({len(layers)} of {num_layers}), "
        f"sparsity {args.sparsity}, devices {devices or jax.devices()[:1]}")
  times = {}
  for method in args.methods:
    start = time.perf_counter()
    rest = args.rest if methods.get(method).kind == "qk" and args.targets != "qk" else None
    pruned = prune_model(model, PruneSettings(method, args.sparsity, None, layers,
                                              targets=args.targets, rest=rest),
                         token_windows["calibration"], token_windows["heldout"],
                         devices=devices)
    jax.block_until_ready(pruned.weights)
    times[method] = time.perf_counter() - start
    solve = sum(r.get("prune_time_s", 0.0) for r in pruned.layers)
    print(f"  {method:17s} {times[method]:7.1f} s in all; the method's own calls {solve:6.1f} s "
          f"({solve / len(layers):5.2f} s per pruned layer)", flush=True)
  if "magnitude" in times:
    print("ratio to magnitude: " + ", ".join(f"{m} {t / times['magnitude']:.1f}"
                                             for m, t in times.items()))


if __name__ == "__main__":
  main()
