"""The device mesh and the shardings of state and batches.

``jax.jit`` with ``in_shardings``/``out_shardings`` on a ``Mesh`` is today's
pjit. The mesh has two axes, ``data`` and ``fsdp``. Batches are split over
both (every device sees different examples). Parameters and optimizer state
are split along ``fsdp`` on their largest dimension that divides evenly, and
replicated over ``data``; with ``fsdp = 1`` (the default) that is plain data
parallelism. XLA inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(num_devices: int = 0, fsdp: int = 1) -> Mesh:
  """A ``(data, fsdp)`` mesh over ``num_devices`` devices (0: all of them).

  Args:
    num_devices: devices to use, 0 for all visible ones (every process's).
    fsdp: size of the ``fsdp`` axis; ``data`` takes the rest.

  Returns:
    The mesh, devices in ``jax.devices()`` order (process-major).
  """
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"mesh.num_devices={num_devices} but only {len(devices)} "
                       "devices are visible.")
    devices = devices[:num_devices]
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must divide the {len(devices)} devices.")
  grid = np.asarray(devices).reshape(len(devices) // fsdp, fsdp)
  return Mesh(grid, (DATA_AXIS, FSDP_AXIS))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Shards the largest dimension divisible by ``fsdp``; else replicates."""
  if fsdp == 1:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
      spec = [None] * len(shape)
      spec[dim] = FSDP_AXIS
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, state_shapes):
  """NamedShardings for a pytree of ShapeDtypeStructs (params, opt state)."""
  fsdp = mesh.shape[FSDP_AXIS]
  return jax.tree.map(
      lambda s: NamedSharding(mesh, fsdp_spec(tuple(s.shape), fsdp)), state_shapes)


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size",
                     micro_batches: int = 1) -> int:
  """Checks the global batch splits evenly; returns the per-process batch."""
  n_dev = mesh.size * micro_batches
  n_proc = jax.process_count()
  if global_batch % n_dev or global_batch % n_proc:
    per = f" x {micro_batches} micro-batches" if micro_batches > 1 else ""
    raise ValueError(
        f"{what}={global_batch} must be divisible by the {mesh.size} devices of "
        f"the mesh{per} and by the {n_proc} processes; use a multiple of "
        f"{np.lcm(n_dev, n_proc)}, e.g. {what}="
        f"{max(1, round(global_batch / np.lcm(n_dev, n_proc))) * np.lcm(n_dev, n_proc)}.")
  return global_batch // n_proc


def to_global(local_batch, sharding: NamedSharding):
  """Assembles each process's numpy batch into one global sharded array tree."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)
