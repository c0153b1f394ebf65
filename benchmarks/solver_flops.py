"""FLOP rate of `solve_mask` against a dense matmul, both measured in this run on this machine;
and what solving in bfloat16 (`compute_dtype="bfloat16"`) costs in accuracy and gains in time.

Problems: h=9 heads, d=576 (SmolLM2-135M's shape), n=512 tokens × b=4 sequences (the dense
objective) and n=4096 × b=1 (the row-blocked objective, blocks of 64 rows). FLOPs are counted
analytically per step and head, 4bnd² + 4bn²d (two products for the scores, two for the
closed-form gradient), plus the dense reference f(W) once (2bnd² + 2bn²d), which the blocked
objective recomputes at every step (counted apart as "executed"). The reference is a jitted
float32 matmul of the solver's largest operand shape, (b·n, d) @ (d, h·d), timed in the same
run. Each of `--runs` runs takes the best of `--repeats` timings of the jitted solve
(`solver._solve`, without `solve_mask`'s input checks) and of the matmul; the
ratio printed last is the median over runs. The row-blocked problem runs `--blocked-steps`
steps (its steps take seconds each).

The whole public call, `ap.solve_mask` with its input checks, final loss and descent check, is
timed apart on the first size at 10 and 200 steps (`--call-steps`) against a 2048³ float32
matmul: a fixed cost per call shows as a lower rate at 10 steps than at 200. Its useful FLOPs
add the final loss (one more attention forward).

  python benchmarks/solver_flops.py [--sizes 512:4 4096:1] [--steps 5] [--runs 3] [--repeats 3]
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnprune_jax as ap
from attnprune_jax import solver, theory
from attnprune_jax.synthetic import synthetic_problem
from timing import best_time


def matmul_rate(m: int, k: int, n: int, repeats: int = 3) -> float:
  """FLOP/s of a jitted float32 (m, k) @ (k, n) matmul (best of `repeats`)."""
  key_a, key_b = jax.random.split(jax.random.key(1))
  a = jax.random.normal(key_a, (m, k), jnp.float32)
  b = jax.random.normal(key_b, (k, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  return 2 * m * k * n / best_time(lambda: matmul(a, b), repeats)


def flop_counts(h: int, b: int, n: int, d: int, steps: int, blocked: bool) -> tuple[int, int]:
  """(useful, executed) FLOPs of `steps` solver steps: the dense count, and with the blocked
  objective's recomputed reference."""
  reference = h * (2 * b * n * d * d + 2 * b * n * n * d)
  useful = steps * h * (4 * b * n * d * d + 4 * b * n * n * d) + reference
  return useful, useful + (steps - 1) * reference if blocked else useful


def rate_runs(w, x, *, steps: int, runs: int, repeats: int, compute_dtype=None) -> dict:
  """Per run, the best of `repeats` timed solves (after one compiling call) against the best of
  `repeats` matmuls of the operand shape: the same statistic on both sides."""
  h, d = w.shape[0], w.shape[-1]
  b, n = x.shape[0], x.shape[1]
  block = solver.default_block(n)
  blocked = block is not None
  useful, executed = flop_counts(h, b, n, d, steps, blocked)
  # The jitted solve itself (`solve_mask`'s input checks are not timed; its final loss, one
  # attention forward more, is timed but not counted).
  operands = (w, x if compute_dtype is None else x.astype(compute_dtype), jnp.ones_like(w),
              jnp.float32(1e-3), jnp.float32(1e-3))
  solve = lambda: solver._solve(*operands, steps=steps, causal=True, optimizer=None,
                                block=block,
                                compute_dtype=None if compute_dtype is None else jnp.bfloat16)
  start = time.perf_counter()
  solution = jax.block_until_ready(solve())
  compile_s = time.perf_counter() - start
  seconds, ratios = [], []
  for _ in range(runs):
    seconds.append(best_time(solve, repeats, warmup=False))
    ratios.append(useful / seconds[-1] / matmul_rate(b * n, d, h * d, repeats))
  return {"solution": solution, "seconds": seconds, "ratios": ratios, "compile_s": compile_s,
          "useful": useful, "executed": executed, "blocked": blocked}


def call_rate(w, x, *, steps: int, repeats: int) -> float:
  """Useful FLOP/s of the public `ap.solve_mask` (checks, final loss and descent check
  included), best of `repeats` calls after a compiling one."""
  h, d = w.shape[0], w.shape[-1]
  b, n = x.shape[0], x.shape[1]
  useful, _ = flop_counts(h, b, n, d, steps, blocked=False)
  useful += h * (2 * b * n * d * d + 2 * b * n * n * d)  # the loss at the final mask
  solve = lambda: ap.solve_mask(w, x, lam=1e-3, steps=steps, lr=1e-3)
  return useful / best_time(solve, repeats)


def agreement(a, b, w, sparsity: float) -> tuple[float, float]:
  """Fractions of equal binary masks per row from the two solutions: by |M∘W| and by |M|."""
  same = lambda score_a, score_b: float(np.mean(
      np.asarray(ap.binarize(score_a, sparsity)) == np.asarray(ap.binarize(score_b, sparsity))))
  return same(jnp.abs(a * w), jnp.abs(b * w)), same(jnp.abs(a), jnp.abs(b))


def bfloat16_accuracy(w, x, *, steps: int, lam: float = 1e-2) -> None:
  """Prints how far a bfloat16 solve lands from the float32 one: `steps` steps of η = 0.5/L̂ per
  head (L̂ by 20 power iterations at M₀, our choice), far enough for M to move from 1."""
  smoothness = theory.smoothness_measured(jnp.ones_like(w), w, x, lam=lam,
                                          key=jax.random.key(2), iters=20)
  solve = functools.partial(ap.solve_mask, w, x, lam=lam, steps=steps, lr=0.5 / smoothness)
  full, half = solve(), solve(compute_dtype="bfloat16")
  loss_gap = np.abs(np.asarray(half.loss) / np.asarray(full.loss) - 1)
  decrease = np.asarray(full.loss[:, 0] - full.loss[:, -1])
  decrease_gap = np.abs(np.asarray(half.loss[:, 0] - half.loss[:, -1]) / decrease - 1)
  moved = float(jnp.abs(full.mask - 1).max())
  print(f"  bfloat16 accuracy, {steps} steps of 0.5/L per head, lam={lam:g}: loss rel. diff "
        f"max {loss_gap.max():.1e} (final {loss_gap[:, -1].max():.1e}); loss decrease rel. "
        f"diff max {decrease_gap.max():.1e}; mask max |diff| "
        f"{float(jnp.abs(half.mask - full.mask).max()):.1e} against max |M - 1| {moved:.1e}")
  for sparsity in (0.5, 0.7, 0.9):
    by_score, by_mask = agreement(full.mask, half.mask, w, sparsity)
    print(f"    binary masks equal at sparsity {sparsity}: {by_score:.4f} by |M∘W|, "
          f"{by_mask:.4f} by |M|")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heads", type=int, default=9)
  parser.add_argument("--d", type=int, default=576)
  parser.add_argument("--sizes", nargs="+", default=["512:4", "4096:1"],
                      help="problems as n:b (tokens:sequences)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--blocked-steps", type=int, default=2)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-bfloat16", dest="bfloat16", action="store_false",
                      help="skip the bfloat16 comparison (run on the first size)")
  parser.add_argument("--accuracy-steps", type=int, default=50,
                      help="steps of the bfloat16-vs-float32 accuracy comparison")
  parser.add_argument("--call-steps", type=int, nargs="*", default=[10, 200],
                      help="steps of the timed public solve_mask calls (first size)")
  args = parser.parse_args()
  h, d = args.heads, args.d
  print(f"devices: {jax.devices()}  jax {jax.__version__}")
  for index, size in enumerate(args.sizes):
    n, b = (int(v) for v in size.split(":"))
    w, x = synthetic_problem(jax.random.key(0), n=n, d=d, batch=b, rank=64, heads=h)
    steps = args.blocked_steps if solver.default_block(n) else args.steps
    result = rate_runs(w, x, steps=steps, runs=args.runs, repeats=args.repeats)
    best = min(result["seconds"])
    kind = "row-blocked, blocks of 64" if result["blocked"] else "dense"
    print(f"solve_mask h={h} b={b} n={n} d={d} steps={steps} ({kind}): "
          f"{best / steps * 1e3:.0f} ms/step (first call incl. compile "
          f"{result['compile_s']:.1f} s)")
    print(f"  useful {result['useful'] / best / 1e9:.1f} GFLOP/s, executed "
          f"{result['executed'] / best / 1e9:.1f} GFLOP/s; ratio to the matmul "
          f"({b * n}x{d})@({d}x{h * d}) per run: "
          + ", ".join(f"{r:.2f}" for r in result["ratios"]))
    print(f"  median ratio solver / matmul (useful FLOPs), n={n}: "
          f"{statistics.median(result['ratios']):.2f}")
    if index == 0 and args.call_steps:
      reference = matmul_rate(2048, 2048, 2048, args.repeats)
      for steps in args.call_steps:
        rate = call_rate(w, x, steps=steps, repeats=args.repeats if steps <= 20 else 1)
        print(f"  solve_mask call, {steps} steps (checks and final loss included): "
              f"{rate / 1e9:.1f} GFLOP/s, {rate / reference:.2f}x a 2048^3 matmul "
              f"({reference / 1e9:.1f} GFLOP/s)")
    if index == 0 and args.bfloat16:
      low = rate_runs(w, x, steps=steps, runs=1, repeats=args.repeats, compute_dtype="bfloat16")
      print(f"  bfloat16 compute, n={n}: time ratio bf16 / f32 "
            f"{min(low['seconds']) / min(result['seconds']):.2f}")
      bfloat16_accuracy(w, x, steps=args.accuracy_steps)


if __name__ == "__main__":
  main()
