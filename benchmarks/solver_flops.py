"""FLOP rate of `solve_mask` against a dense matmul, both measured in this run on this machine.

Problem (issue 2): h=9 heads, b=4 sequences, n=512 tokens, d=576 (SmolLM2-135M's shape).
The solver's FLOPs per step and head are counted analytically, 4bnd² + 4bn²d (two products for
the scores, two for the closed-form gradient); XLA's own cost analysis is printed beside it.
The reference is a jitted float32 matmul of the solver's largest operand shape,
(b·n, d) @ (d, h·d), and a square 2048³ one. Prints the ratio solver / matmul rate.

  python benchmarks/solver_flops.py [--steps 5] [--repeats 3]
"""

import argparse
import time

import jax
import jax.numpy as jnp

import attnprune_jax as ap
from attnprune_jax import solver
from attnprune_jax.synthetic import synthetic_problem
from timing import best_time


def matmul_rate(m: int, k: int, n: int, repeats: int) -> float:
  """FLOP/s of a jitted float32 (m, k) @ (k, n) matmul."""
  key_a, key_b = jax.random.split(jax.random.key(1))
  a = jax.random.normal(key_a, (m, k), jnp.float32)
  b = jax.random.normal(key_b, (k, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  return 2 * m * k * n / best_time(lambda: matmul(a, b), repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heads", type=int, default=9)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--n", type=int, default=512)
  parser.add_argument("--d", type=int, default=576)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  h, b, n, d = args.heads, args.batch, args.n, args.d

  w, x = synthetic_problem(jax.random.key(0), n=n, d=d, batch=b, rank=64, heads=h)
  run = lambda: ap.solve_mask(w, x, lam=1e-3, steps=args.steps, lr=1e-3)
  compile_start = time.perf_counter()
  jax.block_until_ready(run())
  compile_s = time.perf_counter() - compile_start
  seconds = best_time(run, args.repeats, warmup=False)

  per_step = h * (4 * b * n * d * d + 4 * b * n * n * d)
  reference_once = h * (2 * b * n * d * d + 2 * b * n * n * d)
  flops = args.steps * per_step + reference_once
  xla_flops = solver._solve.lower(
      w, x, jnp.ones_like(w), jnp.float32(1e-3), jnp.float32(1e-3), steps=args.steps,
      causal=True, optimizer=None).compile().cost_analysis().get("flops")
  solver_rate = flops / seconds
  operand_rate = matmul_rate(b * n, d, h * d, args.repeats)
  square_rate = matmul_rate(2048, 2048, 2048, args.repeats)

  print(f"devices: {jax.devices()}  jax {jax.__version__}")
  print(f"solve_mask h={h} b={b} n={n} d={d} steps={args.steps}: {seconds:.3f} s "
        f"({seconds / args.steps * 1e3:.1f} ms/step; first call incl. compile {compile_s:.2f} s)")
  print(f"  FLOPs counted: {flops:.3e} in all, {per_step + reference_once:.3e} for one step "
        f"plus the dense reference; XLA's cost analysis of the same (scan body counted once): "
        f"{xla_flops:.3e}")
  print(f"  solver rate             {solver_rate / 1e9:8.1f} GFLOP/s")
  print(f"  matmul ({b * n}x{d})@({d}x{h * d}) {operand_rate / 1e9:8.1f} GFLOP/s")
  print(f"  matmul 2048^3           {square_rate / 1e9:8.1f} GFLOP/s")
  print(f"ratio solver / matmul of the same operand shape: {solver_rate / operand_rate:.2f}")
  print(f"ratio solver / square matmul:                    {solver_rate / square_rate:.2f}")


if __name__ == "__main__":
  main()
