"""Sharding over devices: sharded solves equal single-device ones (4 simulated CPU devices, in a
subprocess, `sharded_checks.py`), and a bad mesh is a named error."""

import os
from pathlib import Path
import subprocess
import sys

import jax
from jax.sharding import Mesh
import numpy as np
import pytest

import attnprune_jax as ap
from attnprune_jax import sharding
from attnprune_jax.errors import InputError, InputTypeError
import sharded_checks

TESTS = Path(__file__).resolve().parent


@pytest.mark.multidevice
def test_sharded_solves_equal_single_device_ones_on_four_devices():
  # LLVM's optimization level 0 halves the compile time of these small problems; the checks
  # compare sharded with single-device results compiled alike.
  env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                                   "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, str(TESTS / "sharded_checks.py")], cwd=TESTS, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout + run.stderr
  assert run.stdout.split() == [word for check in sharded_checks.CHECKS
                                for word in ("ok", check.__name__)]


def test_one_device_mesh_changes_nothing():
  w = np.random.default_rng(0).normal(size=(2, 6, 6)).astype(np.float32) / 3
  x = np.random.default_rng(1).normal(size=(2, 10, 6)).astype(np.float32)
  single = ap.solve_mask(w, x, lam=1e-2, steps=5, lr=1e-2)
  meshed = ap.solve_mask(w, x, lam=1e-2, steps=5, lr=1e-2, mesh=sharding.problem_mesh(2, 2))
  np.testing.assert_array_equal(meshed.mask, single.mask)


@pytest.mark.parametrize("mesh,error,message", [
    ("all", InputTypeError, "mesh must be a jax.sharding.Mesh"),
    (Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("a", "b")), InputError,
     "mesh must have the axes ('heads', 'windows')"),
])
def test_bad_mesh_is_named(mesh, error, message):
  with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
    ap.solve_mask(np.eye(4), np.ones((2, 3, 4)), lam=0.0, steps=1, lr=1e-3, mesh=mesh)


def test_problem_mesh_checks_its_arguments():
  with pytest.raises(InputError, match="heads"):
    sharding.problem_mesh(0, 2)
  with pytest.raises(InputError, match="devices must hold at least one device"):
    sharding.problem_mesh(2, 2, devices=[])
  for bad in (4, "cpu", [0, 1]):
    with pytest.raises(InputTypeError, match="devices must be a list of jax devices"):
      sharding.problem_mesh(2, 2, devices=bad)
