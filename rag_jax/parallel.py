"""The device mesh every part of rag_jax uses: one "data" axis (pure data parallelism).

Training shards its global batch over every device of every host (`data_mesh()`), each process
feeding its rows (`host_batch`). The passage encoder, and an index searched on the host, work on
this process's devices only (`local_data_mesh()`); the index searched inside the train step is
sharded over the global mesh. Both are the same 1-D "data" mesh over a different device list.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"  # The mesh's one axis name.


def data_mesh(devices: Sequence[jax.Device] | None = None, axis: str = AXIS) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process), Auto axis type, so
  jit and shard_map both accept plain arrays."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (axis,))


def local_data_mesh(axis: str = AXIS) -> Mesh:
  """The same 1-D mesh over this process's devices (index search, passage encoding)."""
  return data_mesh(jax.local_devices(), axis)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded on "data" (multi-host input).

  Every process passes its own consecutive slice of the global batch (the same number of rows
  everywhere); on one host this is a plain sharded device_put.
  """
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def local_rows(mesh: Mesh, n: int) -> slice:
  """The rows of a [n] batch sharded on "data" over `mesh` that this process's devices hold:
  one contiguous block (slice(0, n) on one process). Raises ValueError if they are not
  contiguous (a mesh whose devices interleave processes)."""
  sharding = NamedSharding(mesh, P(AXIS))
  blocks = sorted({(index[0].start or 0, n if index[0].stop is None else index[0].stop)
                   for index in sharding.addressable_devices_indices_map((n,)).values()})
  if any(a[1] != b[0] for a, b in zip(blocks, blocks[1:], strict=False)):
    raise ValueError(f"this process's rows of a batch of {n} are not contiguous: {blocks}")
  return slice(blocks[0][0], blocks[-1][1])


def host_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """A global batch every process holds whole on the host -> global arrays sharded on "data",
  each process feeding only its rows (`local_rows`); on one host a sharded device_put."""
  n = len(next(iter(batch.values())))
  rows = local_rows(mesh, n)
  return global_batch({k: np.asarray(v)[rows] for k, v in batch.items()}, mesh)


def local_copy(tree):
  """A replicated pytree as arrays of this process's first device (host-side work on one
  process, e.g. retrieval on the host); unchanged when every device is this process's."""
  return jax.tree.map(lambda x: x if x.is_fully_addressable else x.addressable_data(0), tree)


def replicate(tree, mesh: Mesh):
  """Puts a pytree that is identical on every process onto all devices of `mesh`.

  On one process this is `jax.device_put`: an array already on the mesh's devices keeps its
  buffer (the result shares it: once a step donates the result, the input is deleted too),
  others are copied device to device, and host values into buffers jax owns. Every leaf can
  therefore be donated to the first training step. (Rebuilding each leaf from a numpy view of
  it instead, as the multi-process branch must, makes on the CPU backend an array that wraps
  the view's memory; a step cannot donate such a buffer and silently allocates a second state,
  and an accelerator's state would make a round trip through host memory.)
  """
  sharding = NamedSharding(mesh, P())
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                             lambda index, x=x: np.asarray(x)[index]), tree)
