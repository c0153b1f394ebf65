"""The demo's step-size rule: η = step_fraction / L̂, halved while the loss rises or diverges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnprune_jax.errors import DivergenceError, InputError
from attnprune_jax.reporting import Reporter
from attnprune_jax.synthetic import synthetic_problem
from attnprune_jax.theory import smoothness_measured
from experiments import demo
from experiments.configs import DemoConfig

SMALL = DemoConfig(n=32, d=16, rank=8, batch=2, steps=200)


@pytest.mark.slow  # the default tier: a rise in the last update is seen (below)
def test_large_logits_make_the_rule_backtrack_until_the_loss_falls():
  # Saturated softmax: L̂ at M₀ is ~λ, so η = 1/L̂ ~ 100 and the loss rises 10⁹-fold.
  w, x = synthetic_problem(jax.random.key(0), n=32, d=16, batch=2, rank=8)
  w = 300 * w
  smoothness = float(smoothness_measured(jnp.ones_like(w), w, x, lam=SMALL.lam,
                                         key=jax.random.key(1)))
  assert 1 / smoothness > 50
  solution, lr, halvings, _ = demo.solve_with_backtracking(w, x, SMALL, smoothness)
  assert halvings > 0 and lr == pytest.approx(1 / smoothness / 2**halvings)
  loss = np.asarray(solution.loss)
  assert np.all(np.diff(loss) <= demo.RISE_TOLERANCE * loss[0]) and loss[-1] < loss[0]


def test_an_absurd_step_fraction_is_an_error_not_a_table(monkeypatch):
  monkeypatch.setattr(demo, "MAX_HALVINGS", 3)  # the same path as 20 halvings, 5x sooner
  config = DemoConfig(n=16, d=8, rank=4, batch=2, steps=20, step_fraction=1e9)
  with pytest.raises(DivergenceError, match=r"--step-fraction 1e\+09"):
    demo.run(config, Reporter(quiet=True))


@pytest.mark.parametrize("field,value,message", [
    ("batch", 0, "batch must be a positive integer"),
    ("n", -1, "n must be a positive integer"),
    ("rank", 17, "rank must be at most d=16"),
    ("step_fraction", float("inf"), "step_fraction must be finite"),
    ("sparsities", (), "sparsities must name at least one"),
    ("sparsities", (1.0,), r"sparsities must be in \[0, 1\)"),
])
def test_config_is_checked(field, value, message):
  with pytest.raises(InputError, match=message):
    DemoConfig(**{"n": 32, "d": 16, "rank": 8, field: value})


def test_a_rise_in_the_last_update_is_seen():
  # One step: the loss history holds only L(M₀); the rise is in L(M₁).
  config = DemoConfig(n=16, d=8, rank=4, batch=2, steps=1, step_fraction=1e3)
  results = demo.run(config, Reporter(quiet=True))
  assert results["lr_halvings"] > 0 and results["loss_after"] <= results["loss_before"]
