"""binarize: exact counts, top scores kept, N:M structure, deterministic ties, jit."""

import fractions
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnprune_jax as ap
from attnprune_jax.errors import InputError
from attnprune_jax.masks import merged_activation_score
from attnprune_jax.patterns import kept_count
import reference_numpy


@pytest.mark.parametrize("shape", [(6, 10), (5, 7), (2, 3, 9)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75, 0.9])
def test_row_groups_keep_exact_count_of_top_scores(shape, sparsity):
  score = np.random.default_rng(0).normal(size=shape)
  keep = np.asarray(ap.binarize(score, sparsity))
  assert keep.dtype == bool and keep.shape == shape
  k = kept_count(shape[-1], sparsity)
  assert (keep.sum(-1) == k).all()
  rows = score.reshape(-1, shape[-1])
  np.testing.assert_array_equal(keep.reshape(rows.shape), reference_numpy.binarize_rows(rows, k))


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_matrix_group_keeps_exact_count_of_top_scores(sparsity):
  score = np.random.default_rng(1).normal(size=(3, 8, 6))
  keep = np.asarray(ap.binarize(score, sparsity, group="matrix"))
  k = kept_count(48, sparsity)
  for h in range(3):
    assert keep[h].sum() == k
    assert score[h][keep[h]].min() > score[h][~keep[h]].max()
  # Per matrix, not per row: row counts differ.
  assert len(set(keep[0].sum(-1).tolist())) > 1


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_structure(n, m):
  score = np.random.default_rng(2).normal(size=(5, 16))
  keep = np.asarray(ap.binarize(score, n / m, n_m=(n, m)))
  groups_keep = keep.reshape(5, 16 // m, m)
  groups_score = score.reshape(5, 16 // m, m)
  assert (groups_keep.sum(-1) == m - n).all()
  kept_min = np.where(groups_keep, groups_score, np.inf).min(-1)
  pruned_max = np.where(groups_keep, -np.inf, groups_score).max(-1)
  assert (kept_min > pruned_max).all()


def test_ties_keep_the_lower_index():
  np.testing.assert_array_equal(ap.binarize(np.ones((2, 6)), 0.5),
                                [[True] * 3 + [False] * 3] * 2)
  score = np.array([[1.0, 3.0, 3.0, 2.0, 3.0, 1.0]])
  np.testing.assert_array_equal(ap.binarize(score, 0.5), [[False, True, True, False, True, False]])
  np.testing.assert_array_equal(ap.binarize(score, 0.5 + 1 / 6),
                                [[False, True, True, False, False, False]])
  np.testing.assert_array_equal(ap.binarize(np.zeros((1, 8)), 0.5, n_m=(2, 4)),
                                [[True, True, False, False] * 2])
  np.testing.assert_array_equal(ap.binarize(np.ones((2, 2)), 0.25, group="matrix"),
                                [[True, True], [True, False]])


def test_counts_round_half_up():
  assert kept_count(7, 0.5) == 4
  assert kept_count(5, 0.5) == 3
  assert kept_count(10, 0.3) == 7
  assert kept_count(64, 0.7) == 19


@pytest.mark.parametrize("text", ["0.05", "0.15", "0.3", "0.35", "0.45", "0.55", "0.65", "0.7",
                                  "0.85", "0.95"])
@pytest.mark.parametrize("size", [10, 20, 30, 50, 60, 100, 576])
def test_counts_follow_the_decimal_sparsity(text, size):
  # Independent reference: exact rational arithmetic on the decimal string.
  expected = math.floor((1 - fractions.Fraction(text)) * size + fractions.Fraction(1, 2))
  assert kept_count(size, float(text)) == expected


def test_count_at_a_half_is_rounded_up_for_decimal_sparsity():
  # (1 − 0.55)·30 is 13.4999… in binary floating point; the documented rule gives 14.
  assert kept_count(30, 0.55) == 14
  score = np.random.default_rng(4).normal(size=(3, 30))
  for sparsity in (0.55, np.float32(0.55), jnp.float32(0.55), np.float64(0.55)):
    assert (np.asarray(ap.binarize(score, sparsity)).sum(-1) == 14).all()


def test_a_group_that_would_keep_nothing_is_an_error():
  with pytest.raises(InputError, match=r"sparsity=0.94 keeps 0 of the 4 entries of each row"):
    ap.binarize(np.ones((2, 4)), 0.94)
  with pytest.raises(InputError, match="keeps 0 of the 4 entries of each matrix"):
    ap.binarize(np.ones((2, 2)), 0.9, group="matrix")
  assert np.asarray(ap.binarize(np.ones((2, 4)), 0.875)).sum(-1).tolist() == [1, 1]


def test_integer_scores_and_jit():
  score = np.random.default_rng(3).integers(-50, 50, size=(4, 8))
  eager = ap.binarize(score, 0.5)
  jitted = jax.jit(functools.partial(ap.binarize, sparsity=0.5))(score)
  np.testing.assert_array_equal(eager, jitted)
  np.testing.assert_array_equal(eager, reference_numpy.binarize_rows(score, 4))


def test_merged_activation_score_of_half_precision_inputs_is_float32():
  # Σ x² of these features is ~1e6, beyond float16's range: a float16 score would be Inf.
  x = np.random.default_rng(5).normal(size=(64, 8)).astype(np.float32) * 150
  w = np.random.default_rng(6).normal(size=(8, 8)).astype(np.float32)
  score = merged_activation_score(jnp.asarray(w, jnp.float16), jnp.asarray(x, jnp.float16))
  assert score.dtype == jnp.float32 and np.isfinite(score).all()
  reference = merged_activation_score(jnp.asarray(w, jnp.float16).astype(jnp.float32),
                                      jnp.asarray(x, jnp.float16).astype(jnp.float32))
  np.testing.assert_allclose(score, reference, rtol=1e-6)
