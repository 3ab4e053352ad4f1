"""The device mesh and the shardings of state and batches.

``jax.jit`` with ``in_shardings``/``out_shardings`` on a ``Mesh`` is today's
pjit. The mesh has two axes, ``data`` and ``fsdp``. Batches are split over
both (every device sees different examples). Parameters and optimizer state
are split along ``fsdp`` on their largest dimension that divides evenly, and
replicated over ``data``; with ``fsdp = 1`` (the default) that is plain data
parallelism. XLA inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from brnpa_jax.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(num_devices: int = 0, fsdp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp)`` mesh over ``num_devices`` devices (0: all of them).

  Args:
    num_devices: devices to use, 0 for all of ``devices``.
    fsdp: size of the ``fsdp`` axis; ``data`` takes the rest.
    devices: the devices to choose from, in order; None: ``jax.devices()``
      (every process's). Ahead-of-time compilation passes a TPU topology's
      devices (``brnpa_jax.train.aot``).

  Returns:
    The mesh, devices in the given order (``jax.devices()``: process-major).

  Raises:
    ConfigError: the devices are too few, or ``fsdp`` does not divide them.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices:
    if num_devices > len(devices):
      raise ConfigError(f"mesh.num_devices={num_devices} but only "
                        f"{len(devices)} devices are visible.")
    devices = devices[:num_devices]
  if fsdp < 1 or len(devices) % fsdp:
    raise ConfigError(f"mesh.fsdp={fsdp} must divide the {len(devices)} devices.")
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


def process_count(mesh: Mesh) -> int:
  """The processes (hosts) that own the mesh's devices."""
  return len({d.process_index for d in mesh.devices.flat})


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size",
                     micro_batches: int = 1, num_processes: int | None = None
                     ) -> int:
  """Checks the global batch splits evenly; returns the per-process batch.

  Args:
    global_batch: the batch over all devices (and micro-batches).
    mesh: the mesh the batch is split over.
    what: the config field, for the message.
    micro_batches: gradient-accumulation steps.
    num_processes: the processes feeding the batch; None:
      ``jax.process_count()`` (a topology compiled ahead of time passes its
      host count, ``process_count(mesh)``).

  Raises:
    ConfigError: it does not divide; the message names a batch that does.
  """
  n_dev = mesh.size * micro_batches
  n_proc = jax.process_count() if num_processes is None else num_processes
  if global_batch % n_dev or global_batch % n_proc:
    per = f" x {micro_batches} micro-batches" if micro_batches > 1 else ""
    raise ConfigError(
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


def abstract_global(global_shapes, sharding: NamedSharding):
  """What ``to_global`` returns, as ShapeDtypeStructs carrying ``sharding``:
  the inputs for lowering a step ahead of time (``jax.jit(...).lower``) on
  devices this process does not have.

  Args:
    global_shapes: a pytree of ``jax.ShapeDtypeStruct`` (or arrays), with
      global (every process's) shapes.
    sharding: the batch sharding (``data_sharding(mesh)``).
  """
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      global_shapes)
