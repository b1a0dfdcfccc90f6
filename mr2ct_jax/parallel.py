"""Data parallelism: the device mesh, the two shardings, global arrays from local shards.

Both trainers (the CycleGAN and the segmentation U-Net) run the same way: the train state is
replicated on every device of a 1-D mesh ('data',), the batch is split along its first axis,
and each JAX process contributes only its own rows of the global batch.
"""

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Batch = dict[str, jax.Array]


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh ('data',) over `devices` (default: all devices)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of the train state and the metrics: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of a batch: split along its first (batch) dimension."""
  return NamedSharding(mesh, P('data'))


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> Batch:
  """Global batch arrays from this process's local batch (numpy or jax arrays).

  Each process passes its own rows (local batch = global batch / process count); the result
  is sharded over the mesh's 'data' axis.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def create_replicated(create: Callable[..., Any], mesh: Mesh, *args: Any) -> Any:
  """`create(*args)` run under jit with every output leaf replicated over `mesh`.

  Creating a train state inside jit places every leaf as a global replicated array, which
  also works when the mesh spans several processes.
  """
  return jax.jit(create, out_shardings=replicated(mesh))(*args)


def abstract_replicated(tree: Any, mesh: Mesh) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs), replicated over `mesh`.

  The restore target of a checkpoint: Orbax places each restored leaf with this sharding.
  """
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded (or any) array, as NumPy, in batch order.

  On one process that is the whole array; on several, a global batch array spans devices
  this process cannot read, so each process takes the rows it holds (e.g. for image grids).
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  rows = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    rows.setdefault(start, np.asarray(shard.data))
  return np.concatenate([rows[start] for start in sorted(rows)])
