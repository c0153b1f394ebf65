"""Sharding a pruning problem over devices: its heads (or KV groups) and its calibration windows.

A problem mesh has two axes. "heads" splits independent problems (the heads of `solve_mask`,
the KV groups of a layer): no communication. "windows" splits the calibration sequences, whose
loss and gradient are sums over windows: XLA inserts one all-reduce of the (d, d) gradient per
step. The solvers are the same jitted functions with or without a mesh; they follow the
shardings of their inputs (`jax.jit` with `NamedSharding`s), so one device and many give the
same masks up to the order of the window sum (float rounding). Their results are replicated on
every device of the mesh (masks are small), so every process can read them.

Several hosts: call `jax.distributed.initialize()` on every host first; `jax.devices()` then
lists every host's devices and `problem_mesh` spans them. Every host runs the same program on
the same inputs (the layer-sequential pipeline is deterministic): `place` builds the global
arrays from the data every host holds, and layers stay in order. (Tested here on one host with
simulated devices only.)
"""

from collections.abc import Sequence
import functools

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from attnprune_jax import validation
from attnprune_jax.errors import InputError, InputTypeError

AXES = ("heads", "windows")


def check_devices(devices) -> list:
  """A non-empty sequence of `jax.Device`s, as a list."""
  if (not isinstance(devices, Sequence) or isinstance(devices, str)
      or not all(isinstance(device, jax.Device) for device in devices)):
    raise InputTypeError(f"devices must be a list of jax devices (e.g. jax.devices()), got "
                         f"{devices!r}")
  if not devices:
    raise InputError("devices must hold at least one device")
  return list(devices)


def problem_mesh(heads: int, windows: int, devices=None) -> Mesh:
  """The largest grid of devices that divides the problem: (heads axis, windows axis).

  Args:
    heads: independent problems (heads, or KV groups of a layer).
    windows: calibration windows (per optimizer step, for minibatched solvers).
    devices: the devices to use; None for all of `jax.devices()`.
  Returns:
    a `Mesh` with axes `AXES` of sizes (p, q), p | heads, q | windows, p·q <= devices, p·q as
    large as possible and, among those, p (no communication) as large as possible.
  """
  heads = validation.check_positive_int("heads", heads)
  windows = validation.check_positive_int("windows", windows)
  devices = check_devices(jax.devices() if devices is None else devices)
  sizes = max(((p, q) for p in _divisors(heads) for q in _divisors(windows)
               if p * q <= len(devices)), key=lambda pq: (pq[0] * pq[1], pq[0]))
  return Mesh(np.asarray(devices[:sizes[0] * sizes[1]]).reshape(sizes), AXES)


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def check_mesh(mesh, *, heads: int, windows: int) -> Mesh:
  """A `Mesh` with axes `AXES` whose sizes divide `heads` and `windows`."""
  if not isinstance(mesh, Mesh):
    raise InputTypeError(f"mesh must be a jax.sharding.Mesh (see sharding.problem_mesh), got "
                         f"{type(mesh).__name__}")
  if tuple(mesh.axis_names) != AXES:
    raise InputError(f"mesh must have the axes {AXES}, got {tuple(mesh.axis_names)}")
  for axis, size in zip(AXES, (heads, windows)):
    if size % mesh.shape[axis]:
      raise InputError(f"the mesh's {axis!r} axis ({mesh.shape[axis]} devices) must divide the "
                       f"problem's {size} {axis}; sharding.problem_mesh picks sizes that do")
  return mesh


def place(array, mesh: Mesh, *axes) -> jax.Array:
  """`array` (the same on every process) as a global array on `mesh`, axis i split over the
  mesh axis `axes[i]` (None: not split); trailing axes are not split."""
  sharding = NamedSharding(mesh, PartitionSpec(*axes))
  return jax.make_array_from_callback(np.shape(array), sharding, lambda index: array[index])


def replicate(tree, mesh: Mesh):
  """Every array of `tree` gathered whole onto each device of `mesh`."""
  return _replicator(mesh)(tree)


@functools.lru_cache(maxsize=None)
def _replicator(mesh: Mesh):
  # One jitted identity per mesh: a new lambda at every call would be traced and compiled anew
  # (once per pruned layer in the pipeline).
  return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, PartitionSpec()))
