"""Peak memory of one `solve_mask` step at (h=9, b=8, n=4096, d=576) on this machine, against
the O(h·b·block·n + b·n·d + h·d²) floor of the row-blocked objective and the dense one's plan.

The step is compiled first; then the process's peak resident set (Linux VmHWM) is reset
(/proc/self/clear_refs) and the step runs, so the peak is the step's alone on top of what the
process already holds (the inputs, JAX, the compiled code). XLA's own memory plan of the step
(temporaries) is printed beside it, and that of the dense objective, which is compiled but not
run. Linux only. On a GPU the device's allocator statistics are read instead (its lifetime peak
of bytes in use, which the inputs and the step's compilation also count towards).

  python benchmarks/solver_memory.py [--heads 9] [--batch 8] [--n 4096] [--d 576] [--block 64]
"""

import argparse
import re
import time

import jax
import jax.numpy as jnp

from attnprune_jax import solver

GIB = 2**30


def resident(field: str) -> float:
  """VmRSS or VmHWM (peak) of this process in bytes."""
  status = open("/proc/self/status").read()
  return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024


def reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heads", type=int, default=9)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--n", type=int, default=4096)
  parser.add_argument("--d", type=int, default=576)
  parser.add_argument("--block", type=int, default=solver.DEFAULT_BLOCK)
  args = parser.parse_args()
  h, b, n, d, block = args.heads, args.batch, args.n, args.d, args.block
  keys = jax.random.split(jax.random.key(0), 2)
  w = jax.random.normal(keys[0], (h, d, d), jnp.float32) / d
  x = jax.random.normal(keys[1], (b, n, d), jnp.float32)
  operands = (w, x, jnp.ones_like(w), jnp.float32(1e-3), jnp.float32(1e-3))
  settings = {"steps": 1, "causal": True, "optimizer": None}

  start = time.perf_counter()
  step = solver._solve.lower(*operands, **settings, block=block).compile()
  compile_s = time.perf_counter() - start
  planned = step.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(operands)
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  before = resident("VmRSS") if on_cpu else device.memory_stats()["bytes_in_use"]
  if on_cpu:
    reset_peak()
  start = time.perf_counter()
  jax.block_until_ready(step(*operands))
  step_s = time.perf_counter() - start
  peak = resident("VmHWM") if on_cpu else device.memory_stats()["peak_bytes_in_use"]
  # Compiled after the step: on a GPU its autotuning could raise the device's lifetime peak.
  dense_planned = solver._solve.lower(*operands, **settings, block=None).compile(
      ).memory_analysis().temp_size_in_bytes

  floor = 4 * (h * b * block * n + b * n * d + h * d * d)
  print(f"one solve_mask step, h={h} b={b} n={n} d={d}, blocks of {block} rows, float32, "
        f"devices {jax.devices()}")
  print(f"  compile {compile_s:.1f} s, step {step_s:.1f} s")
  where = "process" if on_cpu else f"{device.platform} device"
  print(f"  {where} peak during the step {peak / GIB:.2f} GiB (held before it: "
        f"{before / GIB:.2f} GiB; the step added {(peak - before) / GIB:.2f} GiB)")
  print(f"  floor h·b·block·n + b·n·d + h·d² floats: {floor / GIB:.2f} GiB; "
        f"step's addition / floor: {(peak - before) / floor:.2f}")
  print(f"  XLA's plan of the step's temporaries: blocked {planned / GIB:.2f} GiB, dense "
        f"objective {dense_planned / GIB:.2f} GiB (ratio {dense_planned / planned:.0f})")


if __name__ == "__main__":
  main()
