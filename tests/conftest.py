"""Test configuration: float64 is enabled so that gradient tests can be exact.

Library code must not depend on it: every test of float32 behaviour passes float32 arrays
explicitly, and `test_dtypes_are_preserved` checks that float32 stays float32.
"""

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)


def random_problem(seed: int, *, n: int = 7, d: int = 5, batch: int | None = None,
                   scale: float = 1.0, dtype=np.float64):
  """A random merged weight w (d, d), a mask near 1 and hidden states x ((batch,) n, d)."""
  rng = np.random.default_rng(seed)
  lead = () if batch is None else (batch,)
  x = rng.normal(size=lead + (n, d)).astype(dtype)
  w = (scale * rng.normal(size=(d, d)) / np.sqrt(d)).astype(dtype)
  mask = (1.0 + 0.3 * rng.normal(size=(d, d))).astype(dtype)
  return mask, w, x


@pytest.fixture
def problem():
  return random_problem
