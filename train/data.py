"""BAPPS readers (docs/official.md §4.3): 2AFC `ref/ p0/ p1/ judge/` and JND `p0/ p1/ same/` folders -> numpy batches.

As the official `data/` loaders: files are found recursively, aligned by sorted path, judgments are one float per
`.npy`, and each image is `Resize(64)` with Pillow's bilinear filter (antialiased, on uint8), then `ToTensor` and
`Normalize(0.5, 0.5)`: float32 in [-1, 1]. Unlike them, folders whose counts or names disagree are an error, images
are NHWC, and images are read by `lpips_jax.files.read_image` (16-bit and float grayscale at full precision, where
the official's `convert("RGB")` clips them to white); every error names the file and the fix. Images are decoded
by a thread pool, and batches are prepared on a background thread by `lpips_jax.scoring.prefetch`.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lpips_jax.checks import check_positive_int
from lpips_jax.errors import InputError
from lpips_jax.files import read_image

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
    raise InputError(f"{root}: the folders hold different numbers of files: " + ", ".join(
        f"{name}/ {n}" for name, n in counts.items()) + "; each example needs one file in every folder")
  if not next(iter(counts.values())):
    raise InputError(f"{root}: no files found in {'/, '.join(folders)}/ (images {IMAGE_SUFFIXES}, judgments .npy)")
  stems = {name: [p.relative_to(root / name).with_suffix("").as_posix() for p in paths]
           for name, paths in files.items()}
  first = next(iter(stems))
  for name, names in stems.items():
    for i, (a, b) in enumerate(zip(stems[first], names)):
      if a != b:
        raise InputError(f"{root}: file {i} of {first}/ is {a!r} but of {name}/ is {b!r}; examples are aligned "
                         f"by sorted name, so every folder must hold the same names")
  return files


def read_judgments(paths: Sequence[Path]) -> np.ndarray:
  """One number from each `.npy` file (the official reshapes each to (1, 1, 1)): f32 [N] in [0, 1]."""
  return np.array([_judgment(path) for path in paths], np.float32).reshape(len(paths))


def _judgment(path: Path) -> float:
  what = "a judgment file holds one number in [0, 1], as numpy.save writes it"
  try:
    value = np.load(path, allow_pickle=False)  # never unpickle: a pickle can run code
  except Exception as e:  # numpy raises ValueError, EOFError or OSError for pickled, text and truncated files
    detail = "pickled or text data" if "pickled" in str(e) else " ".join(str(e).split()) or type(e).__name__
    raise InputError(f"{path}: not a numpy array file ({detail}); {what}: write it again") from None
  if not isinstance(value, np.ndarray):
    value.close()
    raise InputError(f"{path}: an .npz archive, not a numpy array file; {what}: write it again")
  if value.dtype.kind not in "biuf":
    raise InputError(f"{path} holds a {value.dtype} array; {what}")
  if value.size != 1:
    raise InputError(f"{path} holds an array of shape {value.shape}; {what}")
  number = float(value.reshape(()))
  if not 0 <= number <= 1:  # NaN too
    raise InputError(f"{path} holds {number}; a judgment is the fraction of people who chose p1 (2AFC) or saw no "
                     f"difference (JND): a number in [0, 1]")
  return number


def read_2afc(roots: Sequence[str | os.PathLike]) -> TwoAFC:
  """The 2AFC triplets of one or more set folders (e.g. `dataset/2afc/train/cnn`), concatenated in order."""
  parts = []
  for root in _roots(roots, "2afc"):
    files = _aligned(Path(root), {"ref": IMAGE_SUFFIXES, "p0": IMAGE_SUFFIXES, "p1": IMAGE_SUFFIXES,
                                  "judge": (".npy",)})
    parts.append(TwoAFC(*(tuple(map(str, files[k])) for k in ("ref", "p0", "p1")), read_judgments(files["judge"])))
  return TwoAFC(*(sum((p[i] for p in parts), ()) for i in range(3)), np.concatenate([p.judge for p in parts]))


def read_jnd(roots: Sequence[str | os.PathLike]) -> JND:
  """The JND pairs of one or more set folders (e.g. `dataset/jnd/val/cnn`), concatenated in order."""
  parts = []
  for root in _roots(roots, "jnd"):
    files = _aligned(Path(root), {"p0": IMAGE_SUFFIXES, "p1": IMAGE_SUFFIXES, "same": (".npy",)})
    parts.append(JND(tuple(map(str, files["p0"])), tuple(map(str, files["p1"])), read_judgments(files["same"])))
  return JND(sum((p.p0 for p in parts), ()), sum((p.p1 for p in parts), ()), np.concatenate([p.same for p in parts]))


def _roots(roots: Sequence[str | os.PathLike], kind: str) -> list[Path]:
  example = "dataset/2afc/val/cnn" if kind == "2afc" else "dataset/jnd/val/cnn"
  if isinstance(roots, (str, bytes, os.PathLike)):
    raise InputError(f"pass a list of {kind.upper()} set folders, e.g. [{os.fsdecode(roots)!r}], not one path")
  roots = [Path(root) for root in roots]
  if not roots:
    raise InputError(f"no {kind.upper()} sets given: at least one set folder is needed (e.g. {example})")
  return roots


def resized_size(width: int, height: int, size: int = LOAD_SIZE) -> tuple[int, int]:
  """torchvision `Resize(size)`: the shorter side becomes `size`, the longer `int(size * long / short)`."""
  if width <= height:
    return size, int(size * height / width)
  return int(size * width / height), size


def load_image(path: str | os.PathLike, size: int = LOAD_SIZE) -> np.ndarray:
  """An image file as the official transform gives it, NHWC: f32 [size, size', 3] in [-1, 1].

  8-bit images are the official's bit for bit (`read_image` resizes the 8-bit values, and v / 127.5 - 1 is
  (v / 255 - 0.5) / 0.5 in float32); 16-bit and float grayscale images are read at full precision. An unreadable,
  truncated or oversized file is an `ImageFileError` (a ValueError) naming it.
  """
  return read_image(path, lambda width, height: resized_size(width, height, size))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffled order of epoch `epoch` (int64 [n]): a function of (seed, epoch) only, so a resumed run repeats it."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def _check_one_size(images: dict[str, list[np.ndarray]], paths: dict[str, list[str]]) -> None:
  """The images of a batch (all keys) must have one size to stack; the error names one that differs."""
  square = (LOAD_SIZE, LOAD_SIZE, 3)
  named = [(path, im.shape) for key in images for path, im in zip(paths[key], images[key])]
  shapes = [shape for _, shape in named]
  common = square if square in shapes else Counter(shapes).most_common(1)[0][0]
  odd = [(path, shape) for path, shape in named if shape != common]
  if not odd:
    return
  (path, (h, w, _)), other = odd[0], next(path for path, shape in named if shape == common)
  if common == square:
    raise InputError(f"{path} is not square (its shorter side resized to {LOAD_SIZE}: {w}x{h}), but the other "
                     f"images of its batch are {LOAD_SIZE}x{LOAD_SIZE} (e.g. {other}) and a batch stacks images of "
                     f"one size: crop it to a square, as BAPPS patches are")
  raise InputError(f"{path} is {w}x{h} after resizing, but {other} of the same batch is {common[1]}x{common[0]}; a "
                   f"batch stacks images of one size: resize the set's images to one size")


def batches(data: TwoAFC | JND, order: Sequence[int], batch_size: int, *, pad_to: int | None = None,
            pool: ThreadPoolExecutor | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Batches of `data` in `order`: dicts of f32 arrays, images [B, H, W, 3] (`ref`, `p0`, `p1` or `p0`, `p1`),
  `judge` or `same` [B], and `weight` [B] (1 for examples, 0 for padding). With `pad_to`, every batch is padded to
  that many rows with zero images, so all steps have one shape (training); without it, the last batch is short
  (evaluation: the engine pads for the devices itself)."""
  batch_size = check_positive_int(batch_size, "batch_size")
  if pad_to is not None and pad_to < batch_size:
    raise InputError(f"pad_to ({pad_to}) must be at least batch_size ({batch_size})")
  image_keys = ("ref", "p0", "p1") if isinstance(data, TwoAFC) else ("p0", "p1")
  label_key = "judge" if isinstance(data, TwoAFC) else "same"
  labels = getattr(data, label_key)
  load = pool.map if pool is not None else map
  for start in range(0, len(order), batch_size):
    index = np.asarray(order[start:start + batch_size])
    n = len(index)
    rows = n if pad_to is None else pad_to
    paths = {key: [getattr(data, key)[i] for i in index] for key in image_keys}
    images = {key: list(load(load_image, paths[key])) for key in image_keys}
    _check_one_size(images, paths)
    batch = {}
    for key in image_keys:
      batch[key] = np.concatenate([np.stack(images[key]), np.zeros((rows - n, *images[key][0].shape), np.float32)])
    batch[label_key] = np.concatenate([labels[index], np.zeros(rows - n, np.float32)])
    batch["weight"] = np.concatenate([np.ones(n, np.float32), np.zeros(rows - n, np.float32)])
    yield batch
