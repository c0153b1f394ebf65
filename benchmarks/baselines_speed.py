"""Speed of the baselines on a SmolLM2-sized weight, against a numpy transcription of SparseGPT.

Weight (1536, 576) float32 (an MLP up-projection of SmolLM2-135M), 4096 calibration tokens with
correlated features. Times (best of `--repeats`, after one warm-up call that compiles):
input statistics (Gram + feature norms), magnitude, Wanda, SparseGPT unstructured 50% and 2:4, and
the plain numpy transcription of SparseGPT's loop from the tests (float32, same machine).
Prints seconds and the ratio numpy / ours.

  python benchmarks/baselines_speed.py [--repeats 3]
"""

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

from attnprune_jax.baselines import input_stats, magnitude, sparsegpt, wanda
from timing import best_time

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import reference_numpy  # noqa: E402  (the tests' independent transcription)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=1536)
  parser.add_argument("--cols", type=int, default=576)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  mixing = np.eye(args.cols) + 0.5 * rng.normal(size=(args.cols, args.cols)) / np.sqrt(args.cols)
  x = (rng.normal(size=(args.tokens, args.cols)) @ mixing).astype(np.float32)
  w = rng.normal(size=(args.rows, args.cols)).astype(np.float32)
  stats = input_stats(x)

  timings = {
      "input_stats (Gram + norms)": best_time(lambda: input_stats(x), args.repeats),
      "magnitude 50%": best_time(lambda: magnitude(w, 0.5), args.repeats),
      "wanda 50%": best_time(lambda: wanda(w, stats, 0.5), args.repeats),
      "sparsegpt 50%": best_time(lambda: sparsegpt(w, stats, 0.5), args.repeats),
      "sparsegpt 2:4": best_time(lambda: sparsegpt(w, stats, 0.5, n_m=(2, 4)), args.repeats),
  }
  numpy_unstructured = best_time(
      lambda: reference_numpy.sparsegpt(w, x, 0.5, dtype=np.float32), 1, warmup=False)
  numpy_nm = best_time(
      lambda: reference_numpy.sparsegpt(w, x, 0.5, n_m=(2, 4), dtype=np.float32), 1,
      warmup=False)

  print(f"weight ({args.rows}, {args.cols}) float32, {args.tokens} tokens, "
        f"devices {jax.devices()}, jax {jax.__version__}")
  for name, seconds in timings.items():
    print(f"  {name:28s} {seconds * 1e3:9.1f} ms")
  print(f"  {'numpy transcription 50%':28s} {numpy_unstructured * 1e3:9.1f} ms")
  print(f"  {'numpy transcription 2:4':28s} {numpy_nm * 1e3:9.1f} ms")
  print(f"ratio numpy / ours, sparsegpt 50%: {numpy_unstructured / timings['sparsegpt 50%']:.2f}")
  print(f"ratio numpy / ours, sparsegpt 2:4: {numpy_nm / timings['sparsegpt 2:4']:.2f}")


if __name__ == "__main__":
  main()
