"""theory.smoothness_measured against the dense Hessian on tiny problems."""

import functools

import jax
import numpy as np
import pytest

import attnprune_jax as ap
from attnprune_jax.theory import smoothness_measured
from conftest import random_problem


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_power_iteration_matches_dense_hessian(causal, seed):
  mask, w, x = random_problem(30 + seed, n=6, d=3, batch=2, scale=3.0)
  loss = functools.partial(ap.pruning_loss, w=w, x=x, lam=0.02, causal=causal)
  hessian = jax.hessian(loss)(mask).reshape(mask.size, mask.size)
  np.testing.assert_allclose(hessian, hessian.T, atol=1e-12)
  want = np.abs(np.linalg.eigvalsh(hessian)).max()
  got = smoothness_measured(mask, w, x, lam=0.02, causal=causal, key=jax.random.key(seed),
                            iters=2000)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_pure_l2_term_has_smoothness_lambda():
  # With w = 0 the attention term is constant, so the Hessian is λI.
  mask, _, x = random_problem(40, n=5, d=4)
  got = smoothness_measured(mask, np.zeros((4, 4)), x, lam=0.7, key=jax.random.key(0), iters=5)
  np.testing.assert_allclose(got, 0.7, rtol=1e-12)
