"""Scoring many image pairs on every device: data-parallel `distance` over a 1-D "data" mesh, multi-host ready.

The batch is sharded over the mesh (`jax.jit` with `NamedSharding`), the params are replicated, the last batch is
padded and the padding dropped. Under `jax.distributed` each process passes its own pairs and gets their distances
back in order; all processes run the same number of steps.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lpips_jax.lpips import _distance, check_images, variant


@functools.cache
def _sharded_distance(mesh: jax.sharding.Mesh, **options):
  data = NamedSharding(mesh, PartitionSpec("data"))
  return jax.jit(functools.partial(_distance, spatial=False, per_layer=False, **options),
                 in_shardings=(NamedSharding(mesh, PartitionSpec()), data, data), out_shardings=data)


def _local_batches(a: np.ndarray, b: np.ndarray, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  for start in range(0, len(a), batch):
    yield a[start:start + batch], b[start:start + batch]


def score_pairs(params, a, b=None, *, batch_size: int = 64, mesh: jax.sharding.Mesh | None = None,
                normalize: bool = False, dtype=None, precision=None) -> np.ndarray:
  """LPIPS distances of many pairs, computed on all devices (of all processes).

  Args:
    params: from `lpips_jax.load`.
    a, b: this process's pairs, NHWC [N, H, W, 3] arrays in [-1, 1] (or [0, 1] with `normalize`); or `a` is an
      iterable of `(a_batch, b_batch)` and `b` is None.
    batch_size: pairs per step on each process; rounded up to a multiple of the local device count.
    mesh: a 1-D mesh with axis "data" (default: every device of every process).
    normalize, dtype, precision: as in `lpips_jax.distance`.

  Returns:
    float32 numpy [N]: the distances of this process's pairs, in order.
  """
  mesh = mesh or jax.make_mesh((jax.device_count(),), ("data",))
  local_devices = mesh.local_mesh.size
  batch = -(-batch_size // local_devices) * local_devices
  batches: Iterable = _local_batches(np.asarray(a), np.asarray(b), batch) if b is not None else a
  run = _sharded_distance(mesh, normalize=normalize, dtype=dtype, precision=precision)
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  net = variant(params).net
  out, iterator, shape = [], iter(batches), None
  while True:
    pair = next(iterator, None)
    if pair is not None:
      x, y = (np.asarray(v) for v in pair)
      check_images(x, y, net, normalize=normalize)
      if len(x) > batch:
        raise ValueError(f"a batch of {len(x)} pairs exceeds batch_size {batch}")
      shape = x.shape[1:]
    # Every process must take part in every step: stop only when all are done.
    if jax.process_count() > 1:
      if not multihost_utils.process_allgather(np.int32(pair is not None)).any():
        break
      shape = tuple(int(v) for v in multihost_utils.process_allgather(np.asarray(shape or (0, 0, 3))).max(0))
    elif pair is None:
      break
    n = 0 if pair is None else len(x)
    fill = 0.5 if normalize else 0.0  # padding: valid images, dropped below
    pad = lambda v: np.concatenate([v, np.full((batch - n, *shape), fill, np.float32)]) if n < batch else v
    x, y = (pad(np.zeros((0, *shape), np.float32)),) * 2 if pair is None else (pad(x), pad(y))
    glob = [jax.make_array_from_process_local_data(sharding, v) for v in (x, y)]
    d = run(params, *glob)
    local = sorted(d.addressable_shards, key=lambda s: s.index[0].start or 0)
    out.append(np.concatenate([np.asarray(s.data) for s in local])[:n])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)
