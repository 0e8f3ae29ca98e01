"""Spreading a batch over the local accelerators with JAX's own machinery.

Images never interact, so the batch axis is the only one to split: observations are placed with
a NamedSharding over a one-axis Mesh of the local devices, the model is replicated, and the
jitted fit (GSPMD) runs each device's slice where it lies. Across hosts, call
`jax.distributed.initialize()` first and give each process its own part of the file list.
"""

from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


def batch_mesh(devices=None) -> Mesh:
  """A one-axis mesh over the given (default: all local) devices."""
  devices = jax.local_devices() if devices is None else devices
  return Mesh(np.asarray(devices), (BATCH_AXIS,))


def shard_batch(tree, mesh: Optional[Mesh]):
  """Places every array of `tree` (leading batch axis) split over the mesh; with no mesh or a
  single device it just moves the arrays to the default device. The batch size must be a
  multiple of the device count (pad batches to it)."""
  if mesh is None or mesh.size == 1:
    return jax.device_put(tree)
  sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
  return jax.device_put(tree, sharding)


def replicate(tree, mesh: Optional[Mesh]):
  """Places `tree` whole on every device of the mesh (the model, the fit's constants)."""
  if mesh is None or mesh.size == 1:
    return jax.device_put(tree)
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
