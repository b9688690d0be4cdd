"""The command's pairs: which files it compares, how they are decoded, and how their distances are computed.

`pairs_of` turns the command's paths into (a, b) file pairs and a mode. `ref_distances` and `all_pair_distances`
compare images of one size through `lpips_jax.pairwise` (each image's features once); `stream_pair_distances`
sends any pairs through the engine (`lpips_jax.scoring.run_batches`), decoding ahead of the devices within a bound
on host memory.
"""
from __future__ import annotations

import contextlib
import itertools
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lpips_jax.all_pairs import pairwise
from lpips_jax.checks import check_images, check_structure
from lpips_jax.errors import InputError
from lpips_jax.files import read_image
from lpips_jax.runner import note
from lpips_jax.scoring import (
  batch_distances,
  batch_elpips,
  batch_rows,
  global_mesh,
  local_mesh,
  prefetch,
  row_pixels,
  run_batches,
)

QUEUE = 2  # batches decoded ahead of the devices (each within the budget)
WORKERS = 4  # decoding threads
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def image_files(directory: Path) -> list[Path]:
  """The image files of a directory (by suffix), sorted by name."""
  return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def pairs_of(paths: list[Path]) -> tuple[list[tuple[Path, Path]], str]:
  """The (a, b) file pairs the command compares, in output order, and the mode: 'ref', 'dirs' or 'all'.

  REF IMG [IMG ...] -> (REF, IMG) each; DIR0 DIR1 -> same-named images; DIR -> all pairs of its images.
  """
  for p in paths:
    if not p.exists():
      raise InputError(f"{p}: no such file or directory")
  dirs = [p.is_dir() for p in paths]
  if not any(dirs):
    if len(paths) < 2:
      raise InputError("give a reference image and at least one image to compare with it")
    return [(paths[0], p) for p in paths[1:]], "ref"
  if not all(dirs) or len(paths) > 2:
    raise InputError("give one or two directories, or image files; not a mix")
  if len(paths) == 2:
    names = sorted({p.name for p in image_files(paths[0])} & {p.name for p in image_files(paths[1])})
    if not names:
      raise InputError(f"{paths[0]} and {paths[1]} have no image files with the same name")
    return [(paths[0] / n, paths[1] / n) for n in names], "dirs"
  pairs = list(itertools.combinations(image_files(paths[0]), 2))
  if not pairs:
    raise InputError(f"{paths[0]} holds fewer than two image files")
  return pairs, "all"


def read(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
  """`lpips_jax.files.read_image` (never clipped; a bad file is an ImageFileError naming it), notes on stderr."""
  return read_image(path, size, note=note)


def _read_all(paths: list[Path], size: tuple[int, int] | None = None) -> list[np.ndarray]:
  """Each path's image (resized to `size` if given), decoded by `WORKERS` threads."""
  with _threads() as pool:
    return list(pool.map(lambda p: read(p, size), paths))


@contextlib.contextmanager
def _threads(workers: int = WORKERS) -> Iterator[ThreadPoolExecutor]:
  """A thread pool whose queued work is dropped, not finished, when its block ends early (an error, Ctrl-C, a
  generator closed): only the images being decoded finish, so Ctrl-C ends the command at once."""
  pool = ThreadPoolExecutor(workers)
  try:
    yield pool
  except BaseException:
    pool.shutdown(wait=False, cancel_futures=True)
    raise
  pool.shutdown()


def size_error(a: Path, x: np.ndarray, b: Path, y: np.ndarray) -> InputError:
  return InputError(f"{a} is {x.shape[1]}x{x.shape[0]} but {b} is {y.shape[1]}x{y.shape[0]}; pass --resize to "
                      f"resize the second image of each pair")


def ref_distances(params, ref: Path, others: list[Path], *, resize: bool, batch_size: int,
                  batch_pixels: int | None = None, dtype=None, **sampling) -> np.ndarray:
  """Distances of each image of `others` to `ref`: one `pairwise` row, so REF's features are computed once (at
  most `_feature_batch` images per trunk pass)."""
  x = read(ref)
  ys = _read_all(others, (x.shape[1], x.shape[0]) if resize else None)
  for path, y in zip(others, ys):
    if y.shape != x.shape:
      raise size_error(ref, x, path, y)
  return pairwise(params, x[None], np.stack(ys), batch_size=_feature_batch(x.shape, batch_size, batch_pixels),
                  dtype=dtype, **sampling)[0]


def all_pair_distances(params, pairs: list[tuple[Path, Path]], start: int, *, resize: bool, batch_size: int,
                       batch_pixels: int | None = None, dtype=None, **sampling) -> Iterator[tuple[int, list[float]]]:
  """Distances of `pairs[start:]`, all pairs (i < j) of one directory's files, as `(start, values)`.

  Images of one size go through `pairwise` (each image's features once, `_feature_batch` images per trunk pass);
  pairs of images of different sizes through the engine, with `resize`, or are an error. Only the images of the
  missing pairs are read: pairs among the files from the first missing pair's first image on (on --resume, the
  finished part of that one row is computed again and not written).
  """
  files = sorted({p for pair in pairs for p in pair})
  index = {p: i for i, p in enumerate(files)}
  todo = [(index[a], index[b]) for a, b in pairs[start:]]
  if not todo:
    return
  first = todo[0][0]
  images = dict(zip(range(first, len(files)), _read_all(files[first:])))
  groups: dict[tuple, list[int]] = {}
  for i, x in images.items():
    groups.setdefault(x.shape, []).append(i)
  d: dict[tuple[int, int], float] = {}
  for shape, members in groups.items():
    matrix = pairwise(params, np.stack([images[i] for i in members]), dtype=dtype,
                      batch_size=_feature_batch(shape, batch_size, batch_pixels), **sampling)
    where = {i: k for k, i in enumerate(members)}
    d.update({(i, j): float(matrix[where[i], where[j]]) for i, j in todo if i in where and j in where})
  mixed = [(i, j) for i, j in todo if (i, j) not in d]
  if mixed and not resize:
    i, j = mixed[0]
    raise size_error(files[i], images[i], files[j], images[j])
  with contextlib.closing(stream_pair_distances(params, [(files[i], files[j]) for i, j in mixed], resize=True,
                                                batch_size=batch_size, batch_pixels=batch_pixels,
                                                dtype=dtype, **sampling)) as stream:
    for offset, values in stream:
      d.update(zip(mixed[offset:offset + len(values)], values))
  yield start, [d[pair] for pair in todo]


def _feature_batch(shape: tuple[int, ...], batch_size: int, batch_pixels: int | None) -> int:
  """`pairwise`'s images per feature batch for images of `shape` [H, W, 3]: at most `batch_size`, and as many as
  fit in `batch_pixels` (at least one), as the engine bounds its batches."""
  return batch_rows(batch_size, row_pixels([shape]), batch_pixels, local_mesh())


def file_pair_distances(params, pairs: list[tuple[Path, Path]], *, resize: bool, batch_size: int, progress: bool,
                   batch_pixels: int | None = None, dtype=None, **sampling) -> list[float]:
  """Distances of (a, b) image file pairs, in order (see `stream_pair_distances`)."""
  out: list[float] = []
  with progress_bar(len(pairs), progress) as bar:
    for _, values in stream_pair_distances(params, pairs, resize=resize, batch_size=batch_size,
                                           batch_pixels=batch_pixels, dtype=dtype, **sampling):
      out += values
      bar.update(len(values))
  return out


def stream_pair_distances(params, pairs: list[tuple[Path, Path]], *, resize: bool, batch_size: int,
                          batch_pixels: int | None = None, dtype=None, workers: int = WORKERS, key=None,
                          samples: int = 1, first: int = 0) -> Iterator[tuple[int, list[float]]]:
  """Distances of (a, b) image file pairs as `(start, values)` for consecutive runs of pairs, in order.

  Images are read by `workers` threads on a background thread (`lpips_jax.scoring.prefetch`) while the devices
  compute; with `resize`, each b is resized to its a's size, otherwise a pair of different sizes is a InputError.
  The pairs go through the engine (`lpips_jax.scoring.run_batches`, all devices, asynchronous) in chunks of
  consecutive pairs: within a chunk, the pairs of one image size form batches of up to `batch_rows(batch_size, 2 H W,
  batch_pixels)` pairs (the engine pads to that count), so each image size compiles once and a batch holds at most
  `batch_pixels` pixels (or one pair). Host memory is bounded the same way: a chunk holds up to 2 batches' pairs
  and pixels, the images decoded ahead of it fit in as many pixels, and `QUEUE` batches wait for the devices.

  E-LPIPS (`key`, `samples`) runs each batch as `score_pairs` does: its pairs share its samples, drawn from the key
  folded with the index of its first pair (`first` is the index of `pairs[0]` in the whole list, so a resumed run
  numbers its pairs as the first did).
  """
  v = check_structure(params)
  mesh = global_mesh()
  extra = [()] if key is not None else []  # E-LPIPS's index column, as `run_batches` counts a row's pixels
  rows = lambda shape: batch_rows(batch_size, row_pixels([shape, shape, *extra]), batch_pixels, mesh)
  chunk_pairs, chunk_pixels = 2 * batch_size, 2 * batch_pixels if batch_pixels else None  # a chunk's bounds

  def read_pair(pair):
    x = read(pair[0])
    y = read(pair[1], (x.shape[1], x.shape[0]) if resize else None)
    if x.shape != y.shape:
      raise size_error(pair[0], x, pair[1], y)
    return x, y

  def batches():  # ((chunk start, chunk length, indices in the chunk), (a, b)): the tag travels with the batch
    with _threads(workers) as pool:
      start, chunk, pixels = 0, [], 0
      for x, y in _decoded(pool, read_pair, pairs, chunk_pixels, workers):
        chunk.append((x, y))
        pixels += row_pixels([x.shape, y.shape])
        # Past its pixels, a chunk still takes the pairs of one batch (a batch has a row for each device).
        if len(chunk) >= chunk_pairs or (chunk_pixels and pixels >= chunk_pixels and len(chunk) >= rows(x.shape)):
          yield from grouped(start, chunk)
          start, chunk, pixels = start + len(chunk), [], 0
      if chunk:
        yield from grouped(start, chunk)

  def grouped(start, chunk):
    groups: dict[tuple, list[int]] = {}
    for i, (x, _) in enumerate(chunk):
      groups.setdefault(x.shape, []).append(i)
    for shape, indices in groups.items():
      check_images(chunk[indices[0]][0][None], chunk[indices[0]][1][None], v.net)
      step = rows(shape)
      for k in range(0, len(indices), step):
        part = indices[k:k + step]
        a, b = (np.stack([chunk[i][side] for i in part]) for side in (0, 1))
        index = () if key is None else (np.full(len(part), first + start + part[0], np.int32),)
        yield (start, len(chunk), part), (a, b, *index)

  chunks: dict[int, list] = {}
  stream = prefetch(batches(), QUEUE)
  fn, arg, options = batch_distances, params, {}
  if key is not None:  # E-LPIPS: each batch's samples drawn from the key folded with its first pair's index
    fn, arg, options = batch_elpips, (params, key), {"samples": samples}
  for (start, count, part), (d,) in run_batches(fn, arg, stream, batch_size=batch_size, batch_pixels=batch_pixels,
                                                mesh=mesh, tagged=True, variant=v, normalize=False, dtype=dtype,
                                                precision=None, **options):
    values = chunks.setdefault(start, [None] * count)
    for i, value in zip(part, d):
      values[i] = float(value)
    if all(value is not None for value in values):
      yield start, chunks.pop(start)


def _decoded(pool: ThreadPoolExecutor, read: Callable, items: list, pixels: int | None, workers: int) -> Iterator:
  """`read(item)` of each item, in order, computed by `pool` ahead of the consumer: up to `workers` items, and once
  an item's size is known no more than fit in `pixels` (at least one), so large images are not decoded far ahead."""
  pending: deque = deque()
  ahead, rest = workers, iter(items)
  while True:
    while len(pending) < ahead and (item := next(rest, None)) is not None:
      pending.append(pool.submit(read, item))
    if not pending:
      return
    result = pending.popleft().result()
    if pixels:
      ahead = max(1, min(workers, pixels // max(row_pixels([x.shape for x in result]), 1)))
    yield result


@contextlib.contextmanager
def progress_bar(total: int, progress: bool, initial: int = 0) -> Iterator[tqdm]:
  """A tqdm bar of pairs (and pairs/s) on stderr, wiped rather than left half-drawn above an error message."""
  bar = tqdm(total=total, initial=initial, disable=not progress, unit="pair", file=sys.stderr, smoothing=0.1)
  try:
    yield bar
  except BaseException:
    bar.leave = False
    raise
  finally:
    bar.close()
