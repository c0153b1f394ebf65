"""Bad input raises a clear error naming the argument; traced calls skip value checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attnprune_jax as ap
from attnprune_jax.baselines import accumulate, input_stats
from attnprune_jax.errors import InputError
from attnprune_jax.solver import solve_mask_progressive
from attnprune_jax.theory import smoothness_measured
from conftest import random_problem

MASK, W, X = random_problem(50, n=6, d=4, batch=2)


def with_value(array, index, value):
  out = np.array(array)
  out[index] = value
  return out


BAD_CALLS = {
    "attention x NaN": (lambda: ap.attention_matrix(with_value(X, (0, 1, 2), np.nan), W),
                        ValueError, "x contains NaN or Inf"),
    "attention w Inf": (lambda: ap.attention_matrix(X, with_value(W, (1, 1), np.inf)),
                        ValueError, "w contains NaN or Inf"),
    "attention w shape": (lambda: ap.attention_matrix(X, W[:3]), ValueError, r"w must have shape"),
    "attention x 1-d": (lambda: ap.attention_matrix(X[0, 0], W), ValueError, "x must have shape"),
    "attention x int": (lambda: ap.attention_matrix(X.astype(int), W), TypeError,
                        "x must be a floating-point array"),
    "attention w None": (lambda: ap.attention_matrix(X, None), TypeError, "w must be an array"),
    "loss mask shape": (lambda: ap.pruning_loss(MASK[:3], W, X, lam=0.1), ValueError,
                        "mask must have w's shape"),
    "loss mask NaN": (lambda: ap.pruning_loss(with_value(MASK, (0, 0), np.nan), W, X, lam=0.1),
                      ValueError, "mask contains NaN"),
    "loss negative lam": (lambda: ap.pruning_loss(MASK, W, X, lam=-0.1), ValueError,
                          "lam must be >= 0"),
    "loss NaN lam": (lambda: ap.pruning_loss(MASK, W, X, lam=np.nan), ValueError,
                     "lam must be finite"),
    "loss string lam": (lambda: ap.pruning_loss(MASK, W, X, lam="0.1"), TypeError,
                        "lam must be a real number"),
    "grad x width": (lambda: ap.pruning_grad(MASK, W, X[..., :3], lam=0.1), ValueError,
                     "x must have last axis 4"),
    "grad x 4-d": (lambda: ap.pruning_grad(MASK, W, X[None], lam=0.1), ValueError,
                   "x must be 2-d or 3-d"),
    "grad w not square": (lambda: ap.pruning_grad(MASK, W[:, :3], X, lam=0.1), ValueError,
                          "w must be square"),
    "grad negative lam": (lambda: ap.pruning_grad(MASK, W, X, lam=-1), ValueError, "lam"),
    "error x Inf": (lambda: ap.attention_error(MASK, W, with_value(X, (1, 0, 0), -np.inf)),
                    ValueError, "x contains NaN or Inf"),
    "solve steps 0": (lambda: ap.solve_mask(W, X, lam=0.1, steps=0, lr=0.1), ValueError,
                      "steps must be a positive integer"),
    "solve steps float": (lambda: ap.solve_mask(W, X, lam=0.1, steps=1.5, lr=0.1), TypeError,
                          "steps must be an integer"),
    "solve lr 0": (lambda: ap.solve_mask(W, X, lam=0.1, steps=3, lr=0.0), ValueError,
                   "lr must be > 0"),
    "solve lr negative": (lambda: ap.solve_mask(W, X, lam=0.1, steps=3, lr=-1.0), ValueError,
                          "lr must be > 0"),
    "solve lr missing": (lambda: ap.solve_mask(W, X, lam=0.1, steps=3), ValueError,
                         "lr must be given"),
    "solve lr and optimizer": (lambda: ap.solve_mask(W, X, lam=0.1, steps=3, lr=0.1,
                                                     optimizer=optax.sgd(0.1)),
                               ValueError, "either lr .* or optimizer"),
    "solve optimizer type": (lambda: ap.solve_mask(W, X, lam=0.1, steps=3, optimizer="adam"),
                             TypeError, "optimizer must be an optax.GradientTransformation"),
    "solve negative lam": (lambda: ap.solve_mask(W, X, lam=-0.5, steps=3, lr=0.1), ValueError,
                           "lam must be >= 0"),
    "solve x NaN": (lambda: ap.solve_mask(W, with_value(X, (0, 0, 0), np.nan), lam=0.1, steps=3,
                                          lr=0.1), ValueError, "x contains NaN"),
    "solve w heads NaN": (lambda: ap.solve_mask(with_value(np.stack([W, W]), (1, 0, 0), np.nan),
                                                X, lam=0.1, steps=3, lr=0.1),
                          ValueError, "w contains NaN"),
    "solve w 4-d": (lambda: ap.solve_mask(W[None, None], X, lam=0.1, steps=3, lr=0.1),
                    ValueError, "w must be 2-d or 3-d"),
    "binarize sparsity 1": (lambda: ap.binarize(W, 1.0), ValueError,
                            r"sparsity must be in \[0, 1\)"),
    "binarize sparsity negative": (lambda: ap.binarize(W, -0.1), ValueError,
                                   r"sparsity must be in \[0, 1\)"),
    "binarize sparsity string": (lambda: ap.binarize(W, "0.5"), TypeError,
                                 "sparsity must be a real number"),
    "binarize group": (lambda: ap.binarize(W, 0.5, group="column"), ValueError,
                       "group must be one of"),
    "binarize n_m divisibility": (lambda: ap.binarize(W, 2 / 3, n_m=(2, 3)), ValueError,
                                  "multiple of 3"),
    "binarize n_m order": (lambda: ap.binarize(W, 0.5, n_m=(4, 4)), ValueError,
                           "0 <= n < m"),
    "binarize n_m type": (lambda: ap.binarize(W, 0.5, n_m=2), TypeError,
                          "n_m must be a pair of integers"),
    "binarize n_m sparsity": (lambda: ap.binarize(W, 0.3, n_m=(2, 4)), ValueError,
                              "contradicts n_m"),
    "binarize n_m matrix": (lambda: ap.binarize(W, 0.5, group="matrix", n_m=(2, 4)),
                            ValueError, "group must be 'row'"),
    "binarize NaN score": (lambda: ap.binarize(with_value(W, (2, 2), np.nan), 0.5), ValueError,
                           "score contains NaN"),
    "binarize 1-d score": (lambda: ap.binarize(W[0], 0.5), ValueError,
                           "score must be at least 2-d"),
    "binarize bool score": (lambda: ap.binarize(W > 0, 0.5), TypeError,
                            "score must be a real numeric array"),
    "loss causal string": (lambda: ap.pruning_loss(MASK, W, X, lam=0.1, causal="False"),
                           TypeError, "causal must be True or False, got 'False'"),
    "error causal None": (lambda: ap.attention_error(MASK, W, X, causal=None), TypeError,
                          "causal must be True or False, got None"),
    "attention causal int": (lambda: ap.attention_matrix(X, W, causal=0), TypeError,
                             "causal must be True or False"),
    "solve causal string": (lambda: ap.solve_mask(W, X, lam=0.1, steps=3, lr=0.1, causal="no"),
                            TypeError, "causal must be True or False"),
    "progressive causal None": (lambda: solve_mask_progressive(W, X, sparsity=0.5, lam=0.1,
                                                               lr=0.1, causal=None),
                                TypeError, "causal must be True or False"),
    "smoothness causal string": (lambda: smoothness_measured(MASK, W, X, lam=0.1, causal="True",
                                                             key=jax.random.key(0)),
                                 TypeError, "causal must be True or False"),
    "solve steps beyond int32": (lambda: ap.solve_mask(W, X, lam=0.1, steps=3_000_000_000,
                                                       lr=0.1),
                                 ValueError, "steps must be at most 2147483647"),
    "solve 0 tokens": (lambda: ap.solve_mask(W, X[:, :0], lam=0.1, steps=3, lr=0.1), ValueError,
                       "x must hold at least one sequence of at least one token"),
    "solve batch 0": (lambda: ap.solve_mask(W, X[:0], lam=0.1, steps=3, lr=0.1), ValueError,
                      "x must hold at least one sequence"),
    "loss 0 tokens": (lambda: ap.pruning_loss(MASK, W, X[0, :0], lam=0.1), ValueError,
                      "x must hold at least one sequence of at least one token"),
    "error batch 0": (lambda: ap.attention_error(MASK, W, X[:0]), ValueError,
                      "x must hold at least one sequence"),
    "attention 0 tokens": (lambda: ap.attention_matrix(X[:, :0], W), ValueError,
                           "x must hold at least one token"),
    "solve w 0-d": (lambda: ap.solve_mask(np.zeros((0, 0)), X[..., :0], lam=0.1, steps=3,
                                          lr=0.1), ValueError, "w must be square .* d >= 1"),
    "input_stats scalar": (lambda: input_stats(np.float32(1.0)), ValueError,
                           "x must be at least 2-d"),
    "input_stats ragged": (lambda: input_stats([[1.0, 2.0], [3.0]]), TypeError,
                           "x must be array-like"),
    "accumulate None": (lambda: accumulate(None, X), TypeError, "stats must be InputStats"),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_raises_named_error(name):
  call, error, message = BAD_CALLS[name]
  with pytest.raises(error, match=message) as caught:
    call()
  assert isinstance(caught.value, InputError), "input errors must be InputError (CLI exit 2)"


def test_numpy_and_jax_scalars_are_accepted_like_python_numbers():
  reference = ap.solve_mask(W, X, lam=0.1, steps=3, lr=0.1)
  for steps, lr, lam in ((np.int64(3), np.float32(0.1), np.float64(0.1)),
                         (jnp.int32(3), jnp.float32(0.1), jnp.float32(0.1))):
    solution = ap.solve_mask(W, X, lam=lam, steps=steps, lr=lr)
    np.testing.assert_allclose(solution.mask, reference.mask, rtol=1e-6)
  for sparsity in (np.float32(0.5), jnp.float32(0.5), np.float64(0.5), jnp.asarray(0.5)):
    np.testing.assert_array_equal(ap.binarize(W, sparsity), ap.binarize(W, 0.5))
  with pytest.raises(ValueError, match="sparsity must be a scalar"):
    ap.binarize(W, np.array([0.5, 0.5]))
  with pytest.raises(TypeError, match="steps must be an integer, got bool"):
    ap.solve_mask(W, X, lam=0.1, steps=True, lr=0.1)


def test_value_checks_are_skipped_under_tracing():
  bad_x = with_value(X, (0, 1, 2), np.nan)
  loss = jax.jit(lambda m, w, x: ap.pruning_loss(m, w, x, lam=0.1))(MASK, W, bad_x)
  assert np.isnan(loss)
  traced_lam = jax.jit(lambda lam: ap.pruning_loss(MASK, W, X, lam=lam))(-1.0)
  assert np.isfinite(traced_lam)
  grads = jax.vmap(lambda m: jax.grad(lambda mm: ap.pruning_loss(mm, W, X, lam=0.1))(m))(
      np.stack([MASK, MASK]))
  # float32 autodiff against the closed form (entries of order 0.1): float32 rounding only.
  np.testing.assert_allclose(grads[0], ap.pruning_grad(MASK, W, X, lam=0.1), rtol=1e-5,
                             atol=1e-6)


def test_shape_checks_still_run_under_tracing():
  with pytest.raises(ValueError, match="mask must have w's shape"):
    jax.jit(lambda m: ap.pruning_loss(m, W, X, lam=0.1))(MASK[:3])


def test_more_empty_or_degenerate_inputs_are_named():
  from attnprune_jax.layer_masks import solve_layer
  from attnprune_jax.synthetic import synthetic_problem
  with pytest.raises(InputError, match="x must have at least one input feature"):
    input_stats(np.zeros((3, 0), np.float32))
  with pytest.raises(InputError, match=r"x must hold at least one window of at least one token"):
    solve_layer(np.ones((8, 8), np.float32), np.ones((4, 8), np.float32),
                np.ones((0, 4, 8), np.float32), method="attn", sparsity=0.5, num_kv_heads=1,
                head_dim=4, rope=1e4)
  with pytest.raises(InputError, match=r"outlier_channels must be in \[0, d=3\]"):
    synthetic_problem(jax.random.key(0), n=4, d=3, batch=1, rank=2)
  assert np.asarray(ap.binarize(np.ones((2, 4)), jnp.bfloat16(0.5))).sum() == 4
