"""attention_matrix: against numpy, a hand-worked case, stability, causality, batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnprune_jax as ap
from conftest import random_problem
import reference_numpy


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("causal", [True, False])
def test_matches_numpy_reference(causal):
  _, w, x = random_problem(0, n=9, d=4, scale=2.0, dtype=np.float64)
  got = ap.attention_matrix(x, w, causal=causal)
  np.testing.assert_allclose(got, reference_numpy.attention(x, w, causal), rtol=1e-12, atol=1e-14)


@pytest.mark.usefixtures("x64")
def test_hand_worked_two_tokens():
  # x = [[1], [2]], w = [[a]]: S = a [[1, 2], [2, 4]].
  a = 0.3
  x, w = np.array([[1.0], [2.0]]), np.array([[a]])
  causal = ap.attention_matrix(x, w, causal=True)
  second = np.array([np.exp(2 * a), np.exp(4 * a)]) / (np.exp(2 * a) + np.exp(4 * a))
  np.testing.assert_allclose(causal, [[1.0, 0.0], second], rtol=1e-14)
  full = ap.attention_matrix(x, w, causal=False)
  first = np.array([np.exp(a), np.exp(2 * a)]) / (np.exp(a) + np.exp(2 * a))
  np.testing.assert_allclose(full, [first, second], rtol=1e-14)


@pytest.mark.parametrize("causal", [True, False])
def test_rows_are_probability_vectors(causal):
  _, w, x = random_problem(1, n=11, d=6, batch=3, scale=3.0)
  a = np.asarray(ap.attention_matrix(x, w, causal=causal))
  np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-6)  # 11 float32 terms: a few ulps
  assert (a >= 0).all()
  upper = np.triu(np.ones((11, 11), bool), k=1)
  if causal:
    assert (a[:, upper] == 0).all()
  else:
    assert (a[:, upper] > 0).all()


def test_batched_over_leading_axes():
  _, w, x = random_problem(2, n=6, d=4)
  xs = np.stack([x, 2 * x, -x]).reshape(3, 1, 6, 4)
  got = ap.attention_matrix(xs, w)
  assert got.shape == (3, 1, 6, 6)
  for i in range(3):
    # float32 against the float64 reference on the same (float32) inputs.
    np.testing.assert_allclose(got[i, 0], reference_numpy.attention(xs[i, 0], w, True),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("causal", [True, False])
def test_huge_logits_are_stable_in_float32(causal):
  # Scores of order 1e4: a raw exp overflows; the max-shifted softmax gives the one-hot argmax.
  rng = np.random.default_rng(3)
  x = rng.normal(size=(8, 4)).astype(np.float32) * 30
  w = np.eye(4, dtype=np.float32) * 10
  scores = x @ w @ x.T
  assert np.abs(scores).max() > 1e4
  a = np.asarray(ap.attention_matrix(x, w, causal=causal))
  assert a.dtype == np.float32 and np.isfinite(a).all()
  np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-6)
  if causal:
    scores = np.where(np.tril(np.ones((8, 8), bool)), scores, -np.inf)
  np.testing.assert_array_equal(a.argmax(-1), scores.argmax(-1))


def test_jit_agrees_with_eager():
  _, w, x = random_problem(4, n=5, d=3, batch=2)
  eager = ap.attention_matrix(x, w)
  jitted = jax.jit(ap.attention_matrix, static_argnames="causal")(x, w)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)  # float32: fusion may differ by an ulp


@pytest.mark.usefixtures("x64")
def test_float32_stays_float32_when_float64_is_available():
  _, w, x = random_problem(5, n=5, d=3, batch=2)
  assert ap.attention_matrix(x, w).dtype == jnp.float32
