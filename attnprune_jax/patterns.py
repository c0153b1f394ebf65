"""Sparsity patterns as numbers: how many entries a group keeps, N:M structures, their names.

Pure Python (no JAX), so that settings and command options are checked before JAX loads.

Counts: a group of size g keeps round_half_up((1 − s)·g) entries, computed exactly for the
decimal s the user wrote (0.55 is 11/20, not the binary float just below it). N:M removes the n
lowest of every m consecutive entries along the input (last) axis; its sparsity is n/m.
"""

import fractions
import math
import numbers

from attnprune_jax import validation
from attnprune_jax.errors import InputError, InputTypeError


def kept_count(size: int, sparsity: float) -> int:
  """Entries kept in a group of `size` at `sparsity`: round_half_up((1 − sparsity)·size).

  The product is exact: `sparsity` is taken as the shortest decimal that reads back as the same
  float (repr), so kept_count(30, 0.55) = round_half_up(13.5) = 14.
  """
  exact = fractions.Fraction(repr(validation.check_sparsity(sparsity)))
  return math.floor((1 - exact) * size + fractions.Fraction(1, 2))


def check_n_m(n_m, sparsity: float, cols: int | None = None) -> tuple[int, int]:
  """Validates an (n, m) structure at `sparsity` (for rows of `cols` entries, if given);
  returns (n, m)."""
  if (not isinstance(n_m, (tuple, list)) or len(n_m) != 2
      or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in n_m)):
    raise InputTypeError(f"n_m must be a pair of integers (n, m), got {n_m!r}", argument="n_m")
  n, m = int(n_m[0]), int(n_m[1])
  if not 0 <= n < m:
    raise InputError(f"n_m=(n, m) must satisfy 0 <= n < m, got {n_m!r}", argument="n_m")
  if cols is not None and cols % m:
    raise InputError(f"n_m=({n}, {m}) needs the last axis to be a multiple of {m}, got {cols}",
                     argument="n_m")
  if not math.isclose(sparsity, n / m, abs_tol=1e-9):
    raise InputError(
        f"sparsity={sparsity} contradicts n_m=({n}, {m}), which prunes {n / m}; "
        f"pass sparsity={n / m}", argument="sparsity")
  return n, m


def parse_pattern(text: str) -> tuple[float, tuple[int, int] | None]:
  """'0.7' -> (0.7, None); '2:4' -> (0.5, (2, 4)): N of every M removed, integers 0 <= N < M."""
  if ":" not in text:
    try:
      value = float(text)
    except ValueError:
      raise InputError(f"a sparsity must be a number in [0, 1) or N:M, got {text!r}",
                       argument="sparsity") from None
    return validation.check_sparsity(value), None
  n, _, m = text.partition(":")
  if not (n.isascii() and n.isdigit() and m.isascii() and m.isdigit()) or not int(n) < int(m):
    raise InputError(f"pattern must look like 2:4 (N:M, integers 0 <= N < M), got {text!r}",
                     argument="pattern")
  return int(n) / int(m), (int(n), int(m))


def pattern_name(n_m: tuple[int, int] | None) -> str:
  """'unstructured', or '2:4' for (2, 4)."""
  return "unstructured" if n_m is None else f"{n_m[0]}:{n_m[1]}"
