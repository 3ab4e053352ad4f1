"""The device mesh and the shardings of state and batches.

``jax.jit`` with ``in_shardings``/``out_shardings`` on a ``Mesh`` is today's
pjit: the batch is split along the ``data`` axis, the state is replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D ``data`` mesh over all (or the first ``num_devices``) devices."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"mesh asks for {num_devices} devices but only "
                       f"{len(devices)} are visible.")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size") -> int:
  """Checks the global batch splits evenly; returns the per-process batch."""
  n_data = mesh.shape[DATA_AXIS]
  n_proc = jax.process_count()
  if global_batch % n_data or global_batch % n_proc:
    raise ValueError(
        f"{what}={global_batch} must be divisible by the {n_data} devices of the "
        f"'{DATA_AXIS}' mesh axis and by the {n_proc} processes; use e.g. "
        f"{what}={max(n_data, n_proc) * max(1, global_batch // max(n_data, n_proc))}.")
  return global_batch // n_proc


def to_global(local_batch, sharding: NamedSharding):
  """Assembles each process's numpy batch into one global sharded array tree."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)
