"""The one engine for many pairs: a jitted function over fixed-shape, padded batches on every device of every process.

`run_batches` is what `score_pairs`, the `lpips-jax` command and BAPPS evaluation (`lpips_jax.train.evaluate`) use.
Each batch is padded to one fixed size (so a set compiles once per image size, not once per batch), sharded over a
1-D "data" mesh (`jax.jit` with `NamedSharding`, params replicated), dispatched asynchronously, and its results
fetched one step behind: while the devices compute batch i, the host pads and sends batch i + 1. Under
`jax.distributed` each process passes its own batches and gets their results back in order; all processes run
the same number of steps. `prefetch` moves the producer of the batches (image decoding) onto a background thread.
"""
from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lpips_jax import elpips
from lpips_jax.backbones import NETS
from lpips_jax.checks import check_images, check_mesh, check_params, check_positive_int, check_sampling
from lpips_jax.errors import InputError
from lpips_jax.lpips import pipeline

# The peak memory per pixel of a batch's pairs (2 H W per pair), in bytes, measured through the command: the growth
# of its peak RSS from 3 pairs of 1000x1000 to 3 pairs of 2000x2000 at --batch-size 1 (float32, one CPU device;
# README, "The `lpips-jax` command"). It counts the trunk's activations and the host's decoded images, queued batches
# and padding, so it bounds arrays passed in memory too.
# The ST-LPIPS trunks' were measured the same way beside their plain nets' and scaled by the ratio of the slopes
# (alex_st / alex 4.20: its first conv runs at stride 1; vgg_st / vgg 1.30).
# E-LPIPS's is not measured: vgg's doubled, as its network keeps all 13 conv outputs for the distance where LPIPS keeps
# 5 (its images also grow by the 7-pixel offset padding).
BYTES_PER_PIXEL = {"alex": 90, "squeeze": 196, "vgg": 639, "alex_st": 378, "vgg_st": 832, "vgg_ensemble": 1300}
BATCH_BYTES = 2**30  # the memory one batch may take
BATCH_PIXELS = {net: BATCH_BYTES // b for net, b in BYTES_PER_PIXEL.items()}  # the pixels of a batch's pairs


def score_pairs(params, a, b=None, *, key: jax.Array | None = None, samples: int = 1, batch_size: int = 64,
                mesh: jax.sharding.Mesh | None = None, normalize: bool = False, dtype=None, precision=None,
                batch_pixels: int | None = None) -> np.ndarray:
  """LPIPS distances of many pairs, computed on all devices (of all processes).

  Args:
    params: from `lpips_jax.load`.
    a, b: this process's pairs, NHWC [N, H, W, 3] arrays in [-1, 1] (or [0, 1] with `normalize`), as many in `b`
      as in `a`; or `a` is an iterable of `(a_batch, b_batch)` and `b` is None.
    batch_size: pairs per step on each process, a positive integer; rounded up to a multiple of the local device
      count. For arrays `a`, `b`, a step holds at most the pairs there are and at most `batch_pixels` pixels.
    key, samples: E-LPIPS's (`lpips_jax.distance`), required for its params: the pairs of one step share its
      samples (stratified over the step's pairs, as `distance` over a batch), drawn from
      `jax.random.fold_in(key, i)` with i this process's index of the step's first pair. The same key, batch size
      and device count give the same values.
    mesh: a 1-D mesh with axis "data" (default: every device of every process).
    normalize, dtype, precision: as in `lpips_jax.distance`.
    batch_pixels: the most pixels of a step's pairs (2 H W each), for arrays `a`, `b` (default: the net's budget,
      `BATCH_PIXELS`, about 1 GiB of memory); an iterable's batches are the caller's, each padded to `batch_size`.

  Returns:
    float32 numpy [N]: the distances of this process's pairs, in order ([0] for no pairs).

  Every batch is checked as `lpips_jax.distance` checks its inputs (the arrays `a`, `b` once, before the first
  step), and raises a ValueError naming the problem and the fix.

  Example:
    >>> d = lpips_jax.score_pairs(lpips_jax.load("alex"), a, b, batch_size=128)   # a, b: [N, 64, 64, 3]
  """
  v = check_params(params)
  options = dict(variant=v, normalize=normalize, dtype=dtype, precision=precision)
  ensemble = NETS[v.net].ensemble
  key = check_sampling(v.net, key, samples)
  if ensemble:
    options.update(samples=int(samples))
  batch_size = check_positive_int(batch_size, "batch_size (pairs per step)")
  check_mesh(mesh)
  if b is not None:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim and b.ndim and len(a) != len(b):
      raise InputError(f"a holds {len(a)} images and b {len(b)}; score_pairs compares a[i] with b[i]: pass as "
                       f"many of each")
    check_images(a, b, v.net, normalize=normalize)
    # Bounded by the pairs there are (on every process: each step has one global shape) and by pixels.
    batch_size = min(batch_size, max(_most_on_any_process(len(a)), 1))
    batch_pixels = BATCH_PIXELS[v.net] if batch_pixels is None else check_positive_int(batch_pixels, "batch_pixels")
    shapes = [a.shape[1:], b.shape[1:]] + ([()] if ensemble else [])  # as `run_batches` counts a row (`indexed`)
    step = batch_rows(batch_size, row_pixels(shapes), batch_pixels, mesh or global_mesh())
    batches: Iterable = ((a[i:i + step], b[i:i + step]) for i in range(0, len(a), step))
  elif hasattr(a, "shape"):
    raise InputError(f"b is missing: score_pairs(params, a, b) scores a[i] against b[i] (a has shape {a.shape}); "
                     f"or pass an iterable of (a_batch, b_batch) pairs as a")
  else:
    batches = (_checked_pair(item, v.net, normalize) for item in a)
    batch_pixels = None if batch_pixels is None else check_positive_int(batch_pixels, "batch_pixels")
  if ensemble:  # each batch carries the index of its first pair, which picks its samples' key
    batches, params = indexed(batches), (params, key)
  out = [d for (d,) in run_batches(batch_elpips if ensemble else batch_distances, params, batches,
                                   batch_size=batch_size, batch_pixels=batch_pixels, mesh=mesh, **options)]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def indexed(batches: Iterable) -> Iterator[tuple[np.ndarray, ...]]:
  """Each batch `(a, b)` as `(a, b, first)`, `first` [len(a)] filled with the index of its first pair."""
  start = 0
  for a, b in batches:
    yield a, b, np.full(len(a), start, np.int32)
    start += len(a)


def _most_on_any_process(n: int) -> int:
  """The largest `n` of all processes (`n` itself with one process)."""
  if jax.process_count() == 1:
    return n
  return int(multihost_utils.process_allgather(np.int64(n)).max())


def _checked_pair(item, net: str, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
  """One `(a_batch, b_batch)` item of `score_pairs`' batches, after `check_images`."""
  if not (isinstance(item, (tuple, list)) and len(item) == 2):
    raise InputError(f"each item of score_pairs' batches must be a pair (a_batch, b_batch); got a "
                     f"{type(item).__name__}{f' of length {len(item)}' if hasattr(item, '__len__') else ''}")
  x, y = item
  check_images(x, y, net, normalize=normalize)
  return x, y


def batch_distances(params, a, b, *, variant, normalize=False, dtype=None, precision=None):
  """`distance` of a batch of checked pairs, for `run_batches` (the params' variant parsed once by the caller)."""
  return pipeline(params, a, b, variant=variant, spatial=False, per_layer=False, normalize=normalize, dtype=dtype,
                   precision=precision)


def batch_elpips(params_and_key, a, b, first, *, variant, samples, normalize=False, dtype=None, precision=None):
  """E-LPIPS of a batch of checked pairs, for `run_batches`: its samples drawn from the key folded with `first[0]`,
  the index of the batch's first pair (`score_pairs`)."""
  params, key = params_and_key
  return elpips.pipeline(params, a, b, jax.random.fold_in(key, first[0]), variant=variant, samples=samples,
                         per_layer=False, normalize=normalize, dtype=dtype, precision=precision)


def run_batches(fn: Callable, params, batches: Iterable, *, batch_size: int, batch_pixels: int | None = None,
                mesh: jax.sharding.Mesh | None = None, tagged: bool = False, **options) -> Iterator:
  """`fn(params, *arrays, **options)` over `batches`, each batch's outputs yielded in order as numpy arrays.

  Args:
    fn: a module-level function (it and `options` key the compilation cache) of the params and k arrays with a
      leading batch axis, returning an array or a tuple of arrays with that leading axis.
    batches: tuples of k host arrays of up to `batch_size` rows (the same count in each); batches may differ in
      their other dimensions (each shape compiles once).
    batch_size: every batch is padded to this, rounded up to a multiple of the local device count, with zeros
      (valid images whichever the value range); padded rows are dropped from the outputs.
    batch_pixels: with it, a batch of large images is padded to fewer rows: `batch_rows(batch_size, pixels of a
      row, batch_pixels, mesh)`, where a row's pixels are those of all its arrays (2 H W for a pair of images), so
      that a batch's memory is bounded by its pixels, not only by its row count. Producers split with the same
      function.
    mesh: a 1-D mesh with axis "data" (default: every device of every process).
    tagged: each item of `batches` is `(tag, arrays)`, and each output `(tag, outputs)`: whatever the caller needs
      to place a batch's results (which pairs it holds) travels with it.

  Yields:
    for each batch, the tuple of its outputs with the padding removed (with `tagged`, beside its tag). The results
    of batch i are fetched after batch i + 1 has been dispatched, so the devices never wait for the host's copy.
  """
  mesh = mesh or global_mesh()
  size = lambda shapes: batch_rows(batch_size, row_pixels(shapes), batch_pixels, mesh)
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  items = batches if tagged else ((None, arrays) for arrays in batches)
  finish = (lambda tag, out, n: (tag, _fetch(out, n))) if tagged else (lambda tag, out, n: _fetch(out, n))
  pending = None
  for tag, arrays, n, real in _padded(items, size):
    out = _jitted(fn, mesh, len(arrays), tuple(sorted(options.items())))(
        params, *(jax.make_array_from_process_local_data(sharding, x) for x in arrays))
    if pending is not None:
      yield finish(*pending)
    pending = (tag, out, n) if real else None  # a process's all-padding steps (multi-process) yield nothing
  if pending is not None:
    yield finish(*pending)


def padded_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """`batch_size` rounded up to a multiple of the mesh's local device count, so every device gets an equal share."""
  batch_size = check_positive_int(batch_size, "batch_size")
  local = mesh.local_mesh.size
  return -(-batch_size // local) * local


def batch_rows(batch_size: int, pixels: int, batch_pixels: int | None, mesh: jax.sharding.Mesh) -> int:
  """The rows of a padded batch whose rows hold `pixels` pixels each: `batch_size`, or with `batch_pixels` as many
  as fit in that many pixels (at least one), rounded up by `padded_batch_size`."""
  rows = batch_size if batch_pixels is None else max(1, min(batch_size, batch_pixels // max(pixels, 1)))
  return padded_batch_size(rows, mesh)


def row_pixels(shapes: Iterable[tuple[int, ...]]) -> int:
  """The pixels of one row of a batch of arrays with these per-row shapes (..., C): the product of all axes but
  the last (the channels), summed over the arrays; 1 for an array without such axes."""
  return sum(int(np.prod(shape[:-1])) for shape in shapes)


def global_mesh() -> jax.sharding.Mesh:
  """A 1-D "data" mesh of every device of every process. Its axis is Auto (XLA propagates shardings): under
  `make_mesh`'s default, Explicit, a gradient's batch contractions need the params placed on the mesh first."""
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def local_mesh() -> jax.sharding.Mesh:
  """A 1-D "data" mesh of this process's devices (Auto axis, as `global_mesh`): the training step's and
  `pairwise`'s."""
  return jax.make_mesh((jax.local_device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.local_devices())


@functools.cache
def _jitted(fn: Callable, mesh: jax.sharding.Mesh, arity: int, options: tuple):
  data, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
  return jax.jit(functools.partial(fn, **dict(options)), in_shardings=(replicated,) + (data,) * arity,
                 out_shardings=data)


def _padded(items: Iterable, size: Callable) -> Iterator[tuple[object, list[np.ndarray], int, bool]]:
  """Each `(tag, batch)` item as `(tag, batch padded to size(per-row shapes) rows, its real row count, True)`. With
  several processes, every process takes part in every step: a process that has run out sends all-padding batches,
  shaped as the others', until all have (`(None, padding, 0, False)`)."""
  multi = jax.process_count() > 1
  iterator, shapes = iter(items), None
  while True:
    item = next(iterator, None)
    tag, batch = item if item is not None else (None, None)
    if batch is not None:
      batch = [np.asarray(x) for x in batch]
      n = len(batch[0])
      shapes = [x.shape[1:] for x in batch]
      rows = size(shapes)
      if any(len(x) != n for x in batch) or n > rows:
        raise InputError(f"a batch holds {[len(x) for x in batch]} rows; every array of a batch needs the same "
                         f"count, at most the batch size {rows}")
    if multi:
      if not multihost_utils.process_allgather(np.int32(batch is not None)).any():
        return
      # Images [B, H, W, C]: the finished processes take the largest shape of those still running.
      mine = np.asarray(shapes[0] if batch is not None else (0, 0, 0), np.int64)
      shape = tuple(int(d) for d in multihost_utils.process_allgather(mine).max(0))
      shapes = [shape] * len(shapes) if shapes else None
    elif batch is None:
      return
    real = batch is not None
    if not real:
      if shapes is None:
        raise InputError("this process passed no batches while others did; pass the arity with one empty batch")
      batch, n = [np.zeros((0, *s), np.float32) for s in shapes], 0
    if multi:
      rows = size(shapes)  # of the shape the processes agreed on
    yield tag, [np.concatenate([x, np.zeros((rows - n, *x.shape[1:]), x.dtype)]) if n < rows else x for x in batch], \
        n, real


def _fetch(out, n: int) -> tuple[np.ndarray, ...]:
  """This process's rows of a sharded result, in order, without the padding."""
  def local(x):
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])[:n]
  return tuple(local(x) for x in (out if isinstance(out, tuple) else (out,)))


def prefetch(iterable: Iterable, size: int) -> Iterator:
  """Iterate `iterable` on a background thread, keeping up to `size` items ready; errors are re-raised here.

  Where image decoding leaves the main thread (the command's and BAPPS' batches): the devices compute while the
  next batches are read. The thread stops when the consumer stops iterating (or is garbage collected).
  """
  items: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in iterable:
        if not put(item):
          return
      put(done)
    except BaseException as e:  # handed to the consumer, which raises it
      put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = items.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
