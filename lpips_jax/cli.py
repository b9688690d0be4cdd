"""The `lpips-jax` command: LPIPS distances between image files (after the official lpips_2imgs/2dirs/1dir scripts).

  lpips-jax REF IMG [IMG ...]   distance of each IMG to REF, one line each
  lpips-jax DIR0 DIR1           CSV of the distances of same-named images in the two directories
  lpips-jax DIR                 CSV of the distances of all pairs of images in DIR
"""
from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from lpips_jax.lpips import distance
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
  """Distances of (a, b) image file pairs, computed in batches of equal-sized images."""
  out = []
  for start in tqdm(range(0, len(pairs), batch_size), disable=not progress, unit="batch", file=sys.stderr):
    a, b = [], []
    for pa, pb in pairs[start:start + batch_size]:
      x = read_image(pa)
      y = read_image(pb, (x.shape[1], x.shape[0]) if resize else None)
      if x.shape != y.shape:
        raise CommandError(f"{pa} is {x.shape[1]}x{x.shape[0]} but {pb} is {y.shape[1]}x{y.shape[0]}; "
                           f"pass --resize to resize the second image of each pair")
      a.append(x)
      b.append(y)
    groups = {}
    for i, x in enumerate(a):
      groups.setdefault(x.shape, []).append(i)
    batch = [0.0] * len(a)
    for indices in groups.values():
      d = distance(params, np.stack([a[i] for i in indices]), np.stack([b[i] for i in indices]))
      for i, v in zip(indices, np.asarray(d)):
        batch[i] = float(v)
    out += batch
  return out


def heat_map(params, a_path: Path, b_path: Path, out: Path, *, resize: bool) -> np.ndarray:
  """Write [a | b | spatial distance] side by side as a PNG; returns the distance map [H, W] it was drawn from."""
  a = read_image(a_path)
  b = read_image(b_path, (a.shape[1], a.shape[0]) if resize else None)
  if a.shape != b.shape:
    raise CommandError(f"{a_path} and {b_path} differ in size; pass --resize")
  d = np.asarray(distance(params, a[None], b[None], spatial=True))[0]
  level = d / max(float(d.max()), 1e-12)
  # A dark-blue -> red -> yellow ramp: readable without matplotlib.
  heat = np.stack([np.clip(3 * level, 0, 1), np.clip(3 * level - 1, 0, 1), np.clip(1 - 3 * abs(level - 0.2), 0, 1)],
                  axis=-1)
  to_uint8 = lambda x: np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
  Image.fromarray(np.concatenate([to_uint8((a + 1) / 2), to_uint8((b + 1) / 2), to_uint8(heat)], axis=1)).save(out)
  return d


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="lpips-jax", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("paths", nargs="+", type=Path, help="REF IMG [IMG ...], or DIR0 DIR1, or DIR")
  parser.add_argument("--net", default="alex", help="alex (default), vgg or squeeze")
  parser.add_argument("--version", default="0.1", choices=["0.1", "0.0"])
  parser.add_argument("-o", "--out", type=Path, help="write the CSV here instead of stdout")
  parser.add_argument("--spatial", type=Path, metavar="OUT.png", help="with two images: write a heat map")
  parser.add_argument("--resize", action="store_true", help="resize each second image to the first's size")
  parser.add_argument("--batch-size", type=int, default=32)
  args = parser.parse_args(argv)
  try:
    for p in args.paths:
      if not p.exists():
        raise CommandError(f"{p}: no such file or directory")
    params = load(args.net, args.version)
    dirs = [p.is_dir() for p in args.paths]
    if any(dirs):
      if not all(dirs) or len(args.paths) > 2:
        raise CommandError("give one or two directories, or image files; not a mix")
      if len(args.paths) == 2:
        names = sorted({p.name for p in image_files(args.paths[0])} & {p.name for p in image_files(args.paths[1])})
        if not names:
          raise CommandError(f"{args.paths[0]} and {args.paths[1]} have no files with the same name")
        pairs = [(args.paths[0] / n, args.paths[1] / n) for n in names]
      else:
        pairs = list(itertools.combinations(image_files(args.paths[0]), 2))
        if not pairs:
          raise CommandError(f"{args.paths[0]} holds fewer than two files")
      d = pair_distances(params, pairs, resize=args.resize, batch_size=args.batch_size, progress=True)
      stream = open(args.out, "w", newline="") if args.out else sys.stdout
      writer = csv.writer(stream)
      writer.writerow(["a", "b", "distance"])
      writer.writerows((str(a), str(b), f"{v:.6f}") for (a, b), v in zip(pairs, d))
      if args.out:
        stream.close()
      return 0
    if len(args.paths) < 2:
      raise CommandError("give a reference image and at least one image to compare with it")
    ref, others = args.paths[0], args.paths[1:]
    d = pair_distances(params, [(ref, p) for p in others], resize=args.resize, batch_size=args.batch_size,
                       progress=False)
    for p, v in zip(others, d):
      print(f"{p}\t{v:.6f}")
    if args.spatial:
      if len(others) != 1:
        raise CommandError("--spatial takes exactly two images")
      heat_map(params, ref, others[0], args.spatial, resize=args.resize)
      print(f"note: heat map written to {args.spatial}", file=sys.stderr)
    return 0
  except (CommandError, ValueError, FileNotFoundError) as e:
    print(f"lpips-jax: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
