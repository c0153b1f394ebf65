"""Input checks shared by the public functions.

Called eagerly, the public functions reject bad input with an `errors.InputError` (a
`ValueError`; `InputTypeError` is also a `TypeError`) that names the argument, what was expected
and what was received. Under `jit`, `vmap` or `grad` the
inputs are tracers: shape and dtype checks still run (they are static), checks that need concrete
values (finiteness, ranges of traced scalars) are skipped.
"""

from collections.abc import Sequence
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from attnprune_jax.errors import InputError, InputTypeError


def is_traced(value) -> bool:
  """True when `value` is an abstract tracer, i.e. its contents are unknown now."""
  return isinstance(value, jax.core.Tracer)


def check_array(name: str, value, *, ndim: int | Sequence[int] | None = None,
                min_ndim: int | None = None, floating: bool = True) -> jax.Array:
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
  if value is None:
    raise InputTypeError(f"{name} must be an array, got None")
  try:
    array = value if is_traced(value) else jnp.asarray(value)
  except TypeError as err:
    raise InputTypeError(f"{name} must be array-like, got {type(value).__name__}") from err
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


def check_scalar(name: str, value, *, minimum: float | None = None,
                 strict: bool = False) -> None:
  """Checks a real scalar hyperparameter: finite, and >= (or >, if strict) `minimum`."""
  if is_traced(value):
    return
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.ndarray,
                                                                  jax.Array)):
    raise InputTypeError(f"{name} must be a real number, got {type(value).__name__}")
  if np.ndim(value) != 0:
    raise InputError(f"{name} must be a scalar, got shape {np.shape(value)}")
  number = float(value)
  if not np.isfinite(number):
    raise InputError(f"{name} must be finite, got {number}")
  if minimum is not None:
    if strict and number <= minimum:
      raise InputError(f"{name} must be > {minimum}, got {number}")
    if not strict and number < minimum:
      raise InputError(f"{name} must be >= {minimum}, got {number}")


def check_positive_int(name: str, value) -> int:
  """Checks a positive Python/numpy integer (a static count such as `steps`)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise InputTypeError(f"{name} must be an integer, got {type(value).__name__}")
  if value <= 0:
    raise InputError(f"{name} must be a positive integer, got {value}")
  return int(value)


def check_sparsity(sparsity) -> float:
  """Checks a target sparsity (fraction of entries removed) in [0, 1)."""
  if isinstance(sparsity, (bool, np.bool_)) or not isinstance(sparsity, numbers.Real):
    raise InputTypeError(
        f"sparsity must be a real number in [0, 1), got {type(sparsity).__name__}")
  value = float(sparsity)
  if not 0.0 <= value < 1.0:
    raise InputError(f"sparsity must be in [0, 1), got {value}")
  return value
