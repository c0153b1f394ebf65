"""Input checks shared by the public functions and the settings.

Called eagerly, the public functions reject bad input with an `errors.InputError` (a
`ValueError`; `InputTypeError` is also a `TypeError`) that names the argument, what was expected
and what was received. Under `jit`, `vmap` or `grad` the
inputs are tracers: shape and dtype checks still run (they are static), checks that need concrete
values (finiteness, ranges of traced scalars) are skipped.

This module imports JAX only when it is handed an array: the settings dataclasses check plain
numbers with it, so that a command rejects a bad option before JAX is loaded.
"""

from collections.abc import Sequence
import numbers
import sys
from typing import TYPE_CHECKING

import numpy as np

from attnprune_jax.errors import InputError, InputTypeError

if TYPE_CHECKING:
  import jax


def _loaded_jax():
  """The jax module if something imported it already, else None (then nothing is a JAX value)."""
  return sys.modules.get("jax")


def is_traced(value) -> bool:
  """True when `value` is an abstract tracer, i.e. its contents are unknown now."""
  jax = _loaded_jax()
  return jax is not None and isinstance(value, jax.core.Tracer)


def at_least_float32(array):
  """float16/bfloat16 arrays as float32; float32 and float64 unchanged (the precision policy:
  masks, losses and scores are computed in at least float32 whatever the input dtype)."""
  import jax.numpy as jnp
  return array.astype(jnp.promote_types(array.dtype, jnp.float32))


def check_array(name: str, value, *, ndim: int | Sequence[int] | None = None,
                min_ndim: int | None = None, floating: bool = True) -> "jax.Array":
  """Converts `value` to an array and checks its rank, dtype and (if concrete) finiteness.

  Args:
    name: the argument's name, for the error message.
    value: array-like input.
    ndim: accepted rank(s); None accepts any rank.
    min_ndim: smallest accepted rank, if given.
    floating: require a floating dtype; otherwise any real numeric dtype (not bool/complex).
  Returns:
    `value` as a jax array (tracers are returned as they are).
  """
  import jax.numpy as jnp
  if value is None:
    raise InputTypeError(f"{name} must be an array, got None")
  try:
    array = value if is_traced(value) else jnp.asarray(value)
  except (TypeError, ValueError) as err:  # e.g. an object, or a ragged nested list
    raise InputTypeError(f"{name} must be array-like (a rectangular array of numbers), got "
                         f"{type(value).__name__}: {err}") from err
  dtype = np.dtype(array.dtype)
  if floating and not jnp.issubdtype(dtype, jnp.floating):
    raise InputTypeError(f"{name} must be a floating-point array, got dtype {dtype}")
  if not floating and (dtype == np.bool_ or not (jnp.issubdtype(dtype, jnp.integer)
                                                 or jnp.issubdtype(dtype, jnp.floating))):
    raise InputTypeError(f"{name} must be a real numeric array, got dtype {dtype}")
  if ndim is not None:
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if array.ndim not in allowed:
      expected = " or ".join(f"{k}-d" for k in allowed)
      raise InputError(f"{name} must be {expected}, got shape {tuple(array.shape)}")
  if min_ndim is not None and array.ndim < min_ndim:
    raise InputError(f"{name} must be at least {min_ndim}-d, got shape {tuple(array.shape)}")
  if not is_traced(array) and jnp.issubdtype(dtype, jnp.floating):
    if not bool(jnp.isfinite(array).all()):
      raise InputError(f"{name} contains NaN or Inf")
  return array


def _scalar(name: str, value, kind: str):
  """`value` as a numpy scalar if it is a Python, numpy or concrete 0-d JAX number of `kind`
  ("integer" or "real"; bools are neither), else an error naming `name`."""
  what = "an integer" if kind == "integer" else "a real number"
  if isinstance(value, (bool, np.bool_)):
    raise InputTypeError(f"{name} must be {what}, got bool", argument=name)
  jax = _loaded_jax()
  if isinstance(value, (np.ndarray, np.generic)) or (jax is not None
                                                      and isinstance(value, jax.Array)):
    if np.ndim(value) != 0:
      raise InputError(f"{name} must be a scalar, got shape {np.shape(value)}", argument=name)
    value = np.asarray(value)[()]
    if not isinstance(value, (np.integer, np.floating, np.bool_)):
      import jax.numpy as jnp  # bfloat16 and other ml_dtypes floats, exact in float32
      if jnp.issubdtype(value.dtype, jnp.floating):
        value = np.float32(value)
  expected = numbers.Integral if kind == "integer" else numbers.Real
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, expected):
    raise InputTypeError(f"{name} must be {what}, got {type(value).__name__}", argument=name)
  return value


def check_scalar(name: str, value, *, minimum: float | None = None,
                 strict: bool = False) -> None:
  """Checks a real scalar hyperparameter: finite, and >= (or >, if strict) `minimum`.

  Python, numpy and concrete 0-d JAX numbers are accepted alike; tracers pass unchecked.
  """
  if is_traced(value):
    return
  number = float(_scalar(name, value, "real"))
  if not np.isfinite(number):
    raise InputError(f"{name} must be finite, got {number}", argument=name)
  if minimum is not None:
    if strict and number <= minimum:
      raise InputError(f"{name} must be > {minimum:g}, got {number:g}", argument=name)
    if not strict and number < minimum:
      raise InputError(f"{name} must be >= {minimum:g}, got {number:g}", argument=name)


MAX_COUNT = np.iinfo(np.int32).max  # step counters run as int32 inside JAX
MAX_STEPS = 10**7  # our choice: far beyond any useful run of a solver


def check_positive_int(name: str, value, *, maximum: int = MAX_COUNT) -> int:
  """Checks a positive integer count such as `steps` (at most `maximum`); returns an int."""
  number = int(_scalar(name, value, "integer"))
  if number <= 0:
    raise InputError(f"{name} must be a positive integer, got {number}", argument=name)
  if number > maximum:
    raise InputError(f"{name} must be at most {maximum}, got {number}", argument=name)
  return number


def check_bool(name: str, value) -> bool:
  """Checks a flag: True or False (numpy bools too), never a string or None."""
  if not isinstance(value, (bool, np.bool_)):
    raise InputTypeError(f"{name} must be True or False, got {value!r}", argument=name)
  return bool(value)


def check_sparsity(sparsity, name: str = "sparsity") -> float:
  """Checks a target sparsity (fraction of entries removed) in [0, 1).

  A numpy or JAX scalar is read as the shortest decimal of its own dtype (float32 0.55 is
  0.55), so that counts follow the decimal the user wrote (see `patterns.kept_count`).
  """
  value = _scalar(name, sparsity, "real")
  value = float(str(value)) if isinstance(value, np.floating) else float(value)
  if not 0.0 <= value < 1.0:
    raise InputError(f"{name} must be in [0, 1), got {value}", argument=name)
  return value
