"""BAPPS readers (docs/official.md §4.3): 2AFC `ref/ p0/ p1/ judge/` and JND `p0/ p1/ same/` folders -> numpy batches.

As the official `data/` loaders: files are found recursively, aligned by sorted path, judgments are one float per
`.npy`, and each image is `Resize(64)` with Pillow's bilinear filter (antialiased, on uint8), then `ToTensor` and
`Normalize(0.5, 0.5)`: float32 in [-1, 1]. Unlike them, folders whose counts or names disagree are an error, and
images are NHWC. Images are decoded by a thread pool, and batches are prepared on a background thread by
`lpips_jax.scoring.prefetch`.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from lpips_jax.scoring import prefetch as prefetch  # the one background producer (re-exported for train.py)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp")  # the official IMG_EXTENSIONS, any case
LOAD_SIZE = 64


class TwoAFC(NamedTuple):
  """A 2AFC set: N triplets of image paths and `judge` f32 [N], the fraction of people who preferred p1."""
  ref: tuple[str, ...]
  p0: tuple[str, ...]
  p1: tuple[str, ...]
  judge: np.ndarray


class JND(NamedTuple):
  """A JND set: N pairs of image paths and `same` f32 [N], the fraction of people who saw no difference."""
  p0: tuple[str, ...]
  p1: tuple[str, ...]
  same: np.ndarray


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder} is not a directory: a BAPPS 2AFC set holds ref/, p0/, p1/ and judge/, a JND "
                            f"set p0/, p1/ and same/ (README, 'Training LPIPS')")
  found = [Path(root) / name for root, _, names in os.walk(folder) for name in names
           if name.lower().endswith(suffixes)]
  return sorted(found)


def _aligned(root: Path, folders: dict[str, tuple[str, ...]]) -> dict[str, list[Path]]:
  """The files of each folder of `root`, sorted; every folder must hold the same names (suffixes aside)."""
  files = {name: _files(root / name, suffixes) for name, suffixes in folders.items()}
  counts = {name: len(paths) for name, paths in files.items()}
  if len(set(counts.values())) != 1:
    raise ValueError(f"{root}: the folders hold different numbers of files: " + ", ".join(
        f"{name}/ {n}" for name, n in counts.items()) + "; each example needs one file in every folder")
  if not next(iter(counts.values())):
    raise ValueError(f"{root}: no files found in {'/, '.join(folders)}/ (images {IMAGE_SUFFIXES}, judgments .npy)")
  stems = {name: [p.relative_to(root / name).with_suffix("").as_posix() for p in paths]
           for name, paths in files.items()}
  first = next(iter(stems))
  for name, names in stems.items():
    for i, (a, b) in enumerate(zip(stems[first], names)):
      if a != b:
        raise ValueError(f"{root}: file {i} of {first}/ is {a!r} but of {name}/ is {b!r}; examples are aligned "
                         f"by sorted name, so every folder must hold the same names")
  return files


def read_judgments(paths: Sequence[Path]) -> np.ndarray:
  """One float from each `.npy` file (the official reshapes each to (1, 1, 1)): f32 [N]."""
  out = np.empty(len(paths), np.float32)
  for i, path in enumerate(paths):
    value = np.load(path, allow_pickle=False)
    if value.size != 1:
      raise ValueError(f"{path} holds an array of shape {value.shape}; a judgment file holds one number in [0, 1]")
    out[i] = value.reshape(())
  if np.any(~np.isfinite(out)) or out.min() < 0 or out.max() > 1:
    raise ValueError(f"judgments in {Path(paths[0]).parent} must be in [0, 1]; found [{out.min()}, {out.max()}]")
  return out


def read_2afc(roots: Sequence[str | os.PathLike]) -> TwoAFC:
  """The 2AFC triplets of one or more set folders (e.g. `dataset/2afc/train/cnn`), concatenated in order."""
  parts = []
  for root in roots:
    files = _aligned(Path(root), {"ref": IMAGE_SUFFIXES, "p0": IMAGE_SUFFIXES, "p1": IMAGE_SUFFIXES,
                                  "judge": (".npy",)})
    parts.append(TwoAFC(*(tuple(map(str, files[k])) for k in ("ref", "p0", "p1")), read_judgments(files["judge"])))
  return TwoAFC(*(sum((p[i] for p in parts), ()) for i in range(3)), np.concatenate([p.judge for p in parts]))


def read_jnd(roots: Sequence[str | os.PathLike]) -> JND:
  """The JND pairs of one or more set folders (e.g. `dataset/jnd/val/cnn`), concatenated in order."""
  parts = []
  for root in roots:
    files = _aligned(Path(root), {"p0": IMAGE_SUFFIXES, "p1": IMAGE_SUFFIXES, "same": (".npy",)})
    parts.append(JND(tuple(map(str, files["p0"])), tuple(map(str, files["p1"])), read_judgments(files["same"])))
  return JND(sum((p.p0 for p in parts), ()), sum((p.p1 for p in parts), ()), np.concatenate([p.same for p in parts]))


def resized_size(width: int, height: int, size: int = LOAD_SIZE) -> tuple[int, int]:
  """torchvision `Resize(size)`: the shorter side becomes `size`, the longer `int(size * long / short)`."""
  if width <= height:
    return size, int(size * height / width)
  return int(size * width / height), size


def load_image(path: str | os.PathLike, size: int = LOAD_SIZE) -> np.ndarray:
  """An image file as the official transform gives it, NHWC: f32 [size, size', 3] in [-1, 1]."""
  with Image.open(path) as image:
    image = image.convert("RGB")
    target = resized_size(*image.size, size)
    if target != image.size:
      image = image.resize(target, Image.BILINEAR)
    pixels = np.asarray(image)
  return (pixels.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffled order of epoch `epoch` (int64 [n]): a function of (seed, epoch) only, so a resumed run repeats it."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def _stack(images: list[np.ndarray], paths: Sequence[str]) -> np.ndarray:
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise ValueError(f"images of one batch have different sizes after resizing, {sorted(shapes)} (e.g. {paths[0]}); "
                     f"BAPPS patches are square")
  return np.stack(images)


def batches(data: TwoAFC | JND, order: Sequence[int], batch_size: int, *, pad_to: int | None = None,
            pool: ThreadPoolExecutor | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Batches of `data` in `order`: dicts of f32 arrays, images [B, 64, 64, 3] (`ref`, `p0`, `p1` or `p0`, `p1`),
  `judge` or `same` [B], and `weight` [B] (1 for examples, 0 for padding). Every batch is padded to `pad_to`
  (default `batch_size`) with zero images, so all steps have one shape; the last may hold fewer examples."""
  pad_to = pad_to or batch_size
  image_keys = ("ref", "p0", "p1") if isinstance(data, TwoAFC) else ("p0", "p1")
  label_key = "judge" if isinstance(data, TwoAFC) else "same"
  labels = getattr(data, label_key)
  load = pool.map if pool is not None else map
  for start in range(0, len(order), batch_size):
    index = np.asarray(order[start:start + batch_size])
    n = len(index)
    batch = {}
    for key in image_keys:
      paths = [getattr(data, key)[i] for i in index]
      images = _stack(list(load(load_image, paths)), paths)
      batch[key] = np.concatenate([images, np.zeros((pad_to - n, *images.shape[1:]), np.float32)])
    batch[label_key] = np.concatenate([labels[index], np.zeros(pad_to - n, np.float32)])
    batch["weight"] = np.concatenate([np.ones(n, np.float32), np.zeros(pad_to - n, np.float32)])
    yield batch
