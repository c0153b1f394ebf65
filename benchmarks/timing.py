"""Wall-clock timing shared by the benchmark scripts (run them as `python benchmarks/NAME.py`)."""

import time

import jax


def best_time(fn, repeats: int, *, warmup: bool = True) -> float:
  """Minimum wall time in seconds of `fn()` over `repeats` calls, each waited on until its
  arrays are ready; one untimed call first (compilation) when `warmup`."""
  if warmup:
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)
