"""Sharded solves against single-device ones, on 4 simulated CPU devices.

Run by `test_sharding.py` in a subprocess (XLA fixes the device count at start-up):
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharded_checks.py
Each check prints "ok NAME" when it passes; a failed assertion ends the run with an error.
"""

import functools
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
import numpy as np

import attnprune_jax as ap
from attnprune_jax import layer_masks, sharding, solver
from attnprune_jax.errors import InputError
from attnprune_jax.solver_config import MaskSolverConfig
from attnprune_jax.models.llama import Llama
from attnprune_jax.pipeline import PruneSettings, prune_model
from attnprune_jax.synthetic import synthetic_problem
from conftest import TINY_LLAMA

# Float32 sums over windows in another order: masks agree to a few units of rounding.
ATOL = 1e-5


def mesh_of(heads: int, windows: int) -> Mesh:
  return Mesh(np.asarray(jax.devices()[:heads * windows]).reshape(heads, windows), sharding.AXES)


def check_problem_mesh():
  sizes = lambda mesh: (mesh.shape["heads"], mesh.shape["windows"])
  assert sizes(sharding.problem_mesh(4, 4)) == (4, 1)  # heads first: no communication
  assert sizes(sharding.problem_mesh(9, 8)) == (1, 4)  # 4 devices beat 3
  assert sizes(sharding.problem_mesh(3, 2)) == (3, 1)
  assert sizes(sharding.problem_mesh(2, 2)) == (2, 2)
  assert sizes(sharding.problem_mesh(5, 1)) == (1, 1)
  assert sizes(sharding.problem_mesh(6, 6, jax.devices()[:2])) == (2, 1)


def check_solve_mask():
  w, x = synthetic_problem(jax.random.key(0), n=48, d=16, batch=4, rank=8, heads=4)
  per_head = jnp.asarray([2e-3, 3e-3, 1e-3, 2e-3])
  for lr, block, meshes in ((per_head, None, ((1, 4),)), (2e-3, 16, ((2, 2),))):
    solve = functools.partial(ap.solve_mask, w, x, lam=1e-2, steps=15, lr=lr)
    single = solve(block=block)
    for heads, windows in meshes:
      mesh = mesh_of(heads, windows)
      sharded = solve(block=block, mesh=mesh)
      # Computed on the mesh, returned whole on each of its devices.
      assert sharded.mask.sharding.is_fully_replicated, sharded.mask.sharding
      assert sharded.mask.sharding.device_set == set(mesh.devices.flat)
      np.testing.assert_allclose(sharded.mask, single.mask, rtol=0, atol=ATOL)
      np.testing.assert_allclose(sharded.loss, single.loss, rtol=1e-5)
      for sparsity in (0.5, 0.8):
        keep = lambda mask: np.asarray(ap.binarize(mask * jnp.abs(w), sparsity))
        assert (keep(sharded.mask) == keep(single.mask)).mean() > 0.999


def check_the_solve_is_split():
  """Each device holds its windows and heads only; the compiled solve keeps the heads split
  and sums the gradient over windows with an all-reduce."""
  w, x = synthetic_problem(jax.random.key(1), n=32, d=8, batch=4, rank=4, heads=2)
  mesh = mesh_of(2, 2)
  placed_w, placed_x = sharding.place(w, mesh, "heads"), sharding.place(x, mesh, "windows")
  assert {shard.data.shape for shard in placed_x.addressable_shards} == {(2, 32, 8)}
  assert {shard.data.shape for shard in placed_w.addressable_shards} == {(1, 8, 8)}
  ones = sharding.place(jnp.ones_like(w), mesh, "heads")
  compiled = solver._solve.lower(placed_w, placed_x, ones, jnp.float32(0.0),
                                 jnp.float32(1e-3), steps=2, causal=True, optimizer=None,
                                 block=None).compile()
  solution, final = compiled.output_shardings
  assert solution.mask.spec == final.spec == PartitionSpec("heads")
  assert "all-reduce" in compiled.as_text()


def check_solve_layer():
  keys = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(keys[0], (2 * 2 * 8, 32)) / 4  # 2 KV groups of 2 query heads, hd 8
  k = jax.random.normal(keys[1], (2 * 8, 32)) / 4
  x = jax.random.normal(keys[2], (4, 24, 32))
  config = MaskSolverConfig(steps=6, rounds=3, steps_per_round=4, reweight_steps=3,
                            windows_per_step=2)
  # Sharding is the same for every method (one solver loop): the one-cut method, dense and
  # row-blocked (t = 24 in blocks of 5: padded rows).
  for method, block, meshes in (("attn", None, ((2, 2),)), ("attn", 5, ((2, 2),))):
    solve = functools.partial(layer_masks.solve_layer, q, k, x, method=method, sparsity=0.5,
                              config=config, num_kv_heads=2, head_dim=8, rope=100.0,
                              block=block)
    single = solve()
    for heads, windows in meshes:
      sharded = solve(mesh=mesh_of(heads, windows))
      np.testing.assert_allclose(sharded.loss, single.loss, rtol=1e-5)
      for name in ("keep_q", "keep_k"):
        np.testing.assert_array_equal(getattr(sharded, name), getattr(single, name))
      for name in ("q_proj", "k_proj"):
        np.testing.assert_allclose(getattr(sharded, name), getattr(single, name), atol=ATOL)


def check_prune_model():
  model = Llama.random(TINY_LLAMA, jax.random.key(0), scale=0.5)
  rng = np.random.default_rng(0)
  calibration, heldout = rng.integers(0, 64, (4, 12)), rng.integers(0, 64, (2, 12))
  settings = PruneSettings("attn", 0.5, None, (1,), MaskSolverConfig(steps=4,
                                                                     windows_per_step=2))
  single = prune_model(model, settings, calibration, heldout)
  sharded = prune_model(model, settings, calibration, heldout, devices=jax.devices())
  for name in ("q_proj", "k_proj"):
    np.testing.assert_allclose(sharded.weights[name], single.weights[name], atol=ATOL)
    np.testing.assert_array_equal(sharded.weights[name] == 0, single.weights[name] == 0)


def check_mesh_must_divide_the_problem():
  w, x = np.ones((3, 4, 4)), np.ones((2, 5, 4))
  for mesh, axis in ((mesh_of(2, 1), "'heads' axis (2 devices) must divide the problem's 3"),
                     (mesh_of(1, 4), "'windows' axis (4 devices) must divide the problem's 2")):
    try:
      ap.solve_mask(w, x, lam=0.0, steps=1, lr=1e-3, mesh=mesh)
    except InputError as err:
      assert axis in str(err), err
    else:
      raise AssertionError("a mesh that does not divide the problem was accepted")


CHECKS = [check_problem_mesh, check_mesh_must_divide_the_problem, check_solve_mask,
          check_the_solve_is_split, check_solve_layer, check_prune_model]

if __name__ == "__main__":
  if len(jax.devices()) != 4:
    sys.exit(f"needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4), "
             f"got {jax.devices()}")
  for check in CHECKS:
    check()
    print("ok", check.__name__, flush=True)
