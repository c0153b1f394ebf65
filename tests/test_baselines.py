"""Baselines: Wanda vs numpy ranking, SparseGPT vs exact OBS and a numpy transcription (float64),
float32 against float64, reconstruction-error ordering, running statistics, damping retries, the
registry."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnprune_jax import methods
from attnprune_jax.baselines import (accumulate, empty_stats, input_stats, magnitude,
                                     sparsegpt, wanda)
from attnprune_jax.baselines.sparsegpt import inverse_hessian_factor
from attnprune_jax.patterns import kept_count
import reference_numpy


def correlated_inputs(seed, tokens, features, *, outliers=4, outlier_scale=20.0):
  """Correlated features (a random mixing) with a few outlier channels, like hidden states."""
  rng = np.random.default_rng(seed)
  mixing = np.eye(features) + 0.5 * rng.normal(size=(features, features)) / np.sqrt(features)
  x = rng.normal(size=(tokens, features)) @ mixing
  x[:, rng.choice(features, outliers, replace=False)] *= outlier_scale
  return x


def reconstruction_error(x, w, new_w):
  return float(np.sum((x @ (np.asarray(w) - np.asarray(new_w)).T) ** 2))


@pytest.mark.parametrize("sparsity,n_m", [(0.5, None), (0.3, None), (0.5, (2, 4)), (0.5, (4, 8))])
def test_wanda_equals_numpy_ranking(sparsity, n_m):
  x = correlated_inputs(0, 64, 16)
  w = np.random.default_rng(1).normal(size=(10, 16))
  keep = np.asarray(wanda(w, x, sparsity, n_m=n_m))
  score = np.abs(w) * np.sqrt((x**2).sum(0))[None, :]
  if n_m is None:
    want = reference_numpy.binarize_rows(score, kept_count(16, sparsity))
  else:
    n, m = n_m
    want = reference_numpy.binarize_rows(score.reshape(-1, m), m - n).reshape(score.shape)
    assert (keep.reshape(10, -1, m).sum(-1) == m - n).all()
  np.testing.assert_array_equal(keep, want)
  assert (keep.sum(-1) == kept_count(16, sparsity)).all()


def test_magnitude_groups():
  w = np.random.default_rng(2).normal(size=(6, 8))
  assert (np.asarray(magnitude(w, 0.5)).sum(-1) == 4).all()
  per_matrix = np.asarray(magnitude(w, 0.5, group="matrix"))
  assert per_matrix.sum() == 24 and np.abs(w)[per_matrix].min() > np.abs(w)[~per_matrix].max()
  assert (np.asarray(magnitude(w, 0.5, n_m=(2, 4))).reshape(6, 2, 4).sum(-1) == 2).all()


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("pruned_columns", [(0, 0, 0), (0, 3, 5)])
def test_sparsegpt_one_weight_per_row_is_exact_obs(pruned_columns):
  # Each row has one tiny weight, the only one pruned. Exact OBS with the columns before it held
  # fixed (SparseGPT's sequential order): δ = −w_q / [H_s⁻¹]_00 · H_s⁻¹[:, 0], H_s = H[q:, q:].
  rng = np.random.default_rng(3)
  x = correlated_inputs(4, 40, 6, outliers=1, outlier_scale=3.0)
  w = rng.uniform(1.0, 2.0, size=(3, 6)) * rng.choice([-1, 1], size=(3, 6))
  for row, q in enumerate(pruned_columns):
    w[row, q] = 1e-3
  new_w, keep = sparsegpt(w, x, 3 / 18, percdamp=0.01)
  h = 2.0 / 40 * x.T @ x
  h += 0.01 * np.mean(np.diag(h)) * np.eye(6)
  for row, q in enumerate(pruned_columns):
    assert not keep[row, q] and keep[row].sum() == 5
    inv = np.linalg.inv(h[q:, q:])
    want = w[row].copy()
    want[q:] -= w[row, q] / inv[0, 0] * inv[:, 0]
    np.testing.assert_allclose(new_w[row], want, rtol=1e-10, atol=1e-13)
    assert new_w[row, q] == 0


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("n_m,blocksize", [(None, 16), (None, 128), ((2, 4), 16), ((4, 8), 32)])
def test_sparsegpt_equals_numpy_transcription(n_m, blocksize):
  x = correlated_inputs(5, 256, 72)
  w = np.random.default_rng(6).normal(size=(40, 72))
  new_w, keep = sparsegpt(w, x, 0.5, n_m=n_m, blocksize=blocksize)
  want_w, want_keep = reference_numpy.sparsegpt(w, x, 0.5, n_m=n_m, blocksize=blocksize)
  np.testing.assert_array_equal(keep, want_keep)
  np.testing.assert_allclose(new_w, want_w, rtol=1e-9, atol=1e-10)
  assert (np.asarray(new_w)[~np.asarray(keep)] == 0).all()


def test_sparsegpt_counts_per_block():
  x = correlated_inputs(7, 128, 40)
  w = np.random.default_rng(8).normal(size=(7, 40))
  _, keep = sparsegpt(w, x, 0.6, blocksize=16)
  for start, count in ((0, 16), (16, 16), (32, 8)):
    assert np.asarray(keep)[:, start:start + count].sum() == kept_count(7 * count, 0.6)


def test_reconstruction_error_orders_sparsegpt_wanda_magnitude():
  x = correlated_inputs(9, 1024, 128)
  w = np.random.default_rng(10).normal(size=(96, 128))
  errors = {name: reconstruction_error(x, w, methods.get(name).prune(w, input_stats(x), 0.5,
                                                                     None)[0])
            for name in methods.names("linear")}
  assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_running_statistics_equal_one_batch():
  x = correlated_inputs(11, 300, 24).astype(np.float32)
  w = np.random.default_rng(12).normal(size=(8, 24)).astype(np.float32)
  stats = empty_stats(24)
  for chunk in np.array_split(x, 7):
    stats = accumulate(stats, chunk)
  whole = input_stats(x)
  assert stats.count == whole.count == 300
  # float32 sums of 300 terms against float64 numpy ones; off-diagonal entries cancel, so their
  # error is measured against the largest entry.
  gram = x.astype(np.float64).T @ x
  np.testing.assert_allclose(stats.gram, gram, rtol=1e-5, atol=1e-6 * np.abs(gram).max())
  np.testing.assert_allclose(stats.sq_norms, np.diag(gram), rtol=1e-5)
  np.testing.assert_array_equal(wanda(w, stats, 0.5), wanda(w, x, 0.5))
  np.testing.assert_allclose(sparsegpt(w, stats, 0.5)[0], sparsegpt(w, x, 0.5)[0], rtol=1e-5,
                             atol=1e-5)
  norms_only = accumulate(empty_stats(24, gram=False), x)
  assert norms_only.gram is None
  np.testing.assert_array_equal(wanda(w, norms_only, 0.5), wanda(w, x, 0.5))
  with pytest.raises(ValueError, match="Gram matrix"):
    sparsegpt(w, norms_only, 0.5)


def test_dead_inputs_are_zeroed_not_nan():
  x = correlated_inputs(13, 64, 16).astype(np.float32)
  x[:, [2, 9]] = 0
  w = np.random.default_rng(14).normal(size=(6, 16)).astype(np.float32)
  new_w, keep = sparsegpt(w, x, 0.5)
  assert np.isfinite(new_w).all()
  assert (np.asarray(new_w)[:, [2, 9]] == 0).all()
  want_w, want_keep = reference_numpy.sparsegpt(w, x, 0.5)
  np.testing.assert_array_equal(keep, want_keep)
  # float32 against the float64 transcription on the same inputs (weights of order 1).
  np.testing.assert_allclose(new_w, want_w, rtol=1e-5, atol=1e-5)


def float64_scores_are_away_from_ties(w, x, sparsity, n_m, margin):
  """Whether, in every group Wanda ranks, the last kept and the first pruned float64 scores
  |W_ij|·‖X_j‖ are more than `margin` (relative) apart."""
  score = np.abs(w.astype(np.float64)) * np.sqrt((x.astype(np.float64)**2).sum(0))
  if n_m is None:
    size, keep = w.shape[1], kept_count(w.shape[1], sparsity)
  else:
    size, keep = n_m[1], n_m[1] - n_m[0]
  ranked = -np.sort(-score.reshape(-1, size), axis=-1)
  return bool((ranked[:, keep - 1] - ranked[:, keep] > margin * ranked[:, keep - 1]).all())


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_float32_wanda_mask_equals_float64_away_from_ties(n_m):
  # float32 scores are within ~1e-6 (relative) of float64 ones (‖X_j‖ sums 256 squares): where
  # kept and pruned scores are further apart than 1e-5 the two masks must be equal.
  for seed in range(3):
    x = correlated_inputs(30 + seed, 256, 64).astype(np.float32)
    w = np.random.default_rng(40 + seed).normal(size=(32, 64)).astype(np.float32)
    assert float64_scores_are_away_from_ties(w, x, 0.5, n_m, margin=1e-5)
    keep = wanda(w, x, 0.5, n_m=n_m)
    with jax.enable_x64(True):
      want = wanda(w.astype(np.float64), x.astype(np.float64), 0.5, n_m=n_m)
    np.testing.assert_array_equal(keep, want)


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_float32_sparsegpt_weights_match_float64(n_m):
  # float32 Cholesky factors of the damped H⁻¹ (1% damping). Seen over 16 problems, condition
  # numbers of H up to 2e7: the same kept entries and weights within 4e-7 of the largest weight;
  # 1e-5 leaves a 25-fold margin, while the updates move weights by O(1).
  for seed in range(2):
    x = correlated_inputs(50 + seed, 256, 64).astype(np.float32)
    w = np.random.default_rng(60 + seed).normal(size=(32, 64)).astype(np.float32)
    new_w, keep = sparsegpt(w, x, 0.5, n_m=n_m, blocksize=32)
    with jax.enable_x64(True):
      want_w, want_keep = sparsegpt(w.astype(np.float64), x.astype(np.float64), 0.5, n_m=n_m,
                                    blocksize=32)
      want_w, want_keep = np.asarray(want_w), np.asarray(want_keep)
    assert new_w.dtype == jnp.float32 and want_w.dtype == np.float64
    assert np.abs(want_w - np.where(want_keep, w, 0)).max() > 0.1
    np.testing.assert_array_equal(keep, want_keep)
    np.testing.assert_allclose(new_w, want_w, rtol=0, atol=1e-5 * np.abs(want_w).max())


def test_failed_cholesky_retries_with_more_damping_and_says_so():
  indefinite = jnp.array([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues 4 and −2, mean diagonal 1
  with pytest.warns(RuntimeWarning, match="Cholesky of the Hessian failed"):
    factor, damping = inverse_hessian_factor(indefinite, 0.01)
  assert damping == pytest.approx(10.0) and np.isfinite(factor).all()


def test_rank_deficient_float32_inputs_never_give_nan():
  rng = np.random.default_rng(15)
  x = rng.normal(size=(5, 32)).astype(np.float32)
  w = rng.normal(size=(8, 32)).astype(np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    new_w, keep = sparsegpt(w, x, 0.5, percdamp=0.0)
  assert new_w.dtype == jnp.float32 and np.isfinite(new_w).all()
  assert np.asarray(keep).sum() == kept_count(8 * 32, 0.5)


def test_registered_linear_methods_share_one_interface():
  assert methods.names("linear") == ("magnitude", "wanda", "sparsegpt")
  x = correlated_inputs(16, 64, 16)
  w = np.random.default_rng(17).normal(size=(6, 16))
  stats = input_stats(x)
  for name in methods.names("linear"):
    method = methods.get(name)
    new_w, keep = method.prune(w, stats, 0.5, (2, 4))
    assert new_w.shape == w.shape and keep.dtype == bool
    assert (np.asarray(keep).reshape(6, 4, 4).sum(-1) == 2).all()
    assert (np.asarray(new_w)[~np.asarray(keep)] == 0).all()
    # Only a method that changes values may move a kept weight.
    moved = ~np.isclose(np.asarray(new_w), w) & np.asarray(keep)
    assert moved.any() == method.changes_values
  assert methods.get("sparsegpt").needs_gram and not methods.get("wanda").needs_gram


BAD = {
    "wanda features": (lambda w, x: wanda(w, x[:, :8], 0.5), ValueError, "16 input features"),
    "sparsegpt features": (lambda w, x: sparsegpt(w, x[:, :8], 0.5), ValueError,
                           "16 input features"),
    "sparsegpt blocksize": (lambda w, x: sparsegpt(w, x, 0.5, blocksize=0), ValueError,
                            "blocksize must be a positive integer"),
    "sparsegpt blocksize n_m": (lambda w, x: sparsegpt(w, x, 0.5, n_m=(2, 4), blocksize=6),
                                ValueError, "blocksize must be a multiple of m=4"),
    "sparsegpt percdamp": (lambda w, x: sparsegpt(w, x, 0.5, percdamp=-0.1), ValueError,
                           "percdamp must be >= 0"),
    "sparsegpt sparsity": (lambda w, x: sparsegpt(w, x, 1.0), ValueError, "sparsity"),
    "sparsegpt x NaN": (lambda w, x: sparsegpt(w, np.where(x > 3, np.nan, x), 0.5), ValueError,
                        "x contains NaN"),
    "wanda w 3-d": (lambda w, x: wanda(w[None], x, 0.5), ValueError, "w must be 2-d"),
    "magnitude NaN": (lambda w, x: magnitude(np.where(w > 1, np.nan, w), 0.5), ValueError,
                      "w contains NaN"),
    "accumulate width": (lambda w, x: accumulate(empty_stats(8), x), ValueError,
                         r"x must have shape \(\.\.\., 8\)"),
    "empty stats": (lambda w, x: wanda(w, empty_stats(16), 0.5), ValueError,
                    "at least one calibration token"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input(name):
  call, error, message = BAD[name]
  x = correlated_inputs(18, 32, 16)
  w = np.random.default_rng(19).normal(size=(4, 16))
  with pytest.raises(error, match=message):
    call(w, x)


def test_half_precision_inputs_are_scored_in_float32():
  # Σ_t x² of these inputs is ~1e6, beyond float16's largest value (65504).
  x = correlated_inputs(7, 64, 16, outlier_scale=40.0).astype(np.float32)
  w = np.random.default_rng(8).normal(size=(10, 16)).astype(np.float32)
  half_w, half_x = jnp.asarray(w, jnp.float16), jnp.asarray(x, jnp.float16)
  reference = wanda(half_w.astype(jnp.float32), half_x.astype(jnp.float32), 0.5)
  np.testing.assert_array_equal(wanda(half_w, half_x, 0.5), reference)
  stats = input_stats(half_x)
  assert stats.sq_norms.dtype == jnp.float32 and np.isfinite(stats.sq_norms).all()
  new_w, keep = sparsegpt(half_w, half_x, 0.5)
  assert new_w.dtype == jnp.float32 and np.isfinite(new_w).all()
  np.testing.assert_array_equal(keep, sparsegpt(half_w.astype(jnp.float32),
                                                half_x.astype(jnp.float32), 0.5)[1])


def test_statistics_are_a_pytree_of_arrays_so_wanda_jits():
  x = correlated_inputs(9, 32, 8).astype(np.float32)
  w = np.random.default_rng(10).normal(size=(6, 8)).astype(np.float32)
  stats = input_stats(x, gram=False)
  assert isinstance(stats.count, jax.Array) and int(stats.count) == 32
  jitted = jax.jit(wanda, static_argnames=("sparsity", "n_m"))
  np.testing.assert_array_equal(jitted(w, stats, sparsity=0.5), wanda(w, stats, 0.5))
  np.testing.assert_array_equal(jitted(w, x, sparsity=0.5, n_m=(2, 4)),
                                wanda(w, x, 0.5, n_m=(2, 4)))
