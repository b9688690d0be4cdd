"""Reading image files and writing files: the two rules every reader and writer of the project follows.

Images: `read_image` is the one decoder (the command, BAPPS training and evaluation). It never clips: 8-bit images
are read as they are; 16-bit and float grayscale images at their full precision, scaled by their own range (65535,
or [0, 1] for float); multi-channel images of more than 8 bits are what Pillow decodes, their top 8 bits (scaled by
the range, as the official's `cv2.imread`), with a note. Images above Pillow's decompression-bomb limit
(`PIL.Image.MAX_IMAGE_PIXELS`, 89.5 megapixels by default) and every decoder failure are an `ImageFileError` that
names the file.

Writing: `atomic_write` writes into a temporary file in the target's directory, flushes it to disk and renames it
over the target, so a reader sees the old file or the new one, never a torn one, and a writer killed mid-write
leaves the previous file (and its temporary `.NAME.*.partial` beside it, which is safe to delete).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from lpips_jax.errors import InputError

# Pillow modes of one channel read at full precision: mode -> the value that maps to white.
HIGH_DEPTH = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), and restored at once
os.umask(_UMASK)


class ImageFileError(InputError):
  """An image file that cannot be read as an LPIPS input; the message names the file, the problem and the fix."""


Size = tuple[int, int] | Callable[[int, int], tuple[int, int]]


def read_image(path: str | os.PathLike, size: Size | None = None, *,
               note: Callable[[str], None] | None = None) -> np.ndarray:
  """An image file as float32 [H, W, 3] in [-1, 1] (8-bit values v: v / 127.5 - 1, the official transform).

  Args:
    path: any image Pillow reads.
    size: resize to (W, H) with Pillow's bilinear filter (on the 8-bit values, as the official loaders), or a
      function of the file's (W, H) giving it (e.g. the BAPPS loader's shorter side to 64).
    note: called with a one-line message when the image is converted (not RGB, alpha dropped, or more than 8 bits
      per channel read at 8).

  Raises:
    ImageFileError: the file is missing, not an image, truncated or otherwise undecodable, above the
      decompression-bomb limit, or a float image with values outside [0, 1]; the message names the file.
  """
  path = Path(path)
  try:
    # Pillow warns above its limit and raises above twice it; commands make its warning an error (bombs_are_errors).
    with Image.open(path) as image:
      return _pixels(path, image, size, note)
  except ImageFileError:
    raise
  except FileNotFoundError:
    raise ImageFileError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise ImageFileError(f"{path}: is a directory, not an image file") from None
  except (Image.DecompressionBombError, Image.DecompressionBombWarning):
    raise ImageFileError(_bomb_message(path)) from None
  except MemoryError:
    raise
  except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, struct/zlib errors
    detail = " ".join(str(e).split()) or type(e).__name__
    raise ImageFileError(f"{path}: not a readable image ({detail}); check that it is a complete image file") from None


def bombs_are_errors() -> None:
  """For a command's process: make Pillow's decompression-bomb warning (above `MAX_IMAGE_PIXELS`, below twice it,
  where Pillow raises) an error, which `read_image` reports as one line. A process-wide filter is a command's to
  set: `warnings.catch_warnings` is not thread-safe, and images are decoded by threads."""
  warnings.simplefilter("error", Image.DecompressionBombWarning)


def _bomb_message(path: Path) -> str:
  limit = Image.MAX_IMAGE_PIXELS
  amount = f"{limit / 1e6:.1f} megapixels" if limit >= 100_000 else f"{limit} pixels"
  return (f"{path}: more than {amount}, Pillow's limit against decompression bombs; if the "
          f"image is genuine, raise the limit (the command's --max-pixels, or PIL.Image.MAX_IMAGE_PIXELS)")


def _pixels(path: Path, image: Image.Image, size: Size | None, note) -> np.ndarray:
  limit = Image.MAX_IMAGE_PIXELS
  if limit is not None and image.width * image.height > limit:
    raise ImageFileError(_bomb_message(path))
  target = size(*image.size) if callable(size) else size
  if image.mode in HIGH_DEPTH:
    return _high_depth(path, image, target)
  if any(";16" in str(tile.args) for tile in getattr(image, "tile", ())) and note:
    note(f"{path} has 16 bits per channel; Pillow decodes its top 8 bits (scaled to the range, not clipped)")
  if image.mode != "RGB":
    if note:
      note(f"{path} is {image.mode}, converted to RGB" + (" (alpha dropped)" if "A" in image.mode else ""))
    image = image.convert("RGB")
  if target is not None and tuple(target) != image.size:
    image = image.resize(tuple(target), Image.BILINEAR)
  return np.asarray(image, np.float32) / np.float32(127.5) - 1


def _high_depth(path: Path, image: Image.Image, target) -> np.ndarray:
  """A one-channel 16-bit or float image at full precision, scaled to [0, 1] by its range, as float32 RGB."""
  values = np.asarray(image).astype(np.float32)
  white = HIGH_DEPTH[image.mode]
  low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
  if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= white):
    kind = "float" if image.mode == "F" else "integer"
    raise ImageFileError(f"{path}: a {kind} image with values in [{low:g}, {high:g}]; lpips_jax reads {kind} "
                         f"images as [0, {white:g}] (0 black, {white:g} white); rescale it into that range")
  unit = Image.fromarray(values / np.float32(white), "F")
  if target is not None and tuple(target) != unit.size:
    unit = unit.resize(tuple(target), Image.BILINEAR)
  gray = np.asarray(unit, np.float32) * 2 - 1
  return np.repeat(gray[..., None], 3, axis=-1)


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[IO[bytes]], object]) -> None:
  """Write `data` (bytes, or a function that writes into a binary file object) to `path` atomically: into a
  temporary file of the same directory, flushed to disk, then renamed over `path` (created with mode 0o644 less the
  umask). A crash or kill at any point leaves `path` as it was."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
  try:
    with os.fdopen(fd, "wb") as f:
      if callable(data):
        data(f)
      else:
        f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(temporary, 0o644 & ~_UMASK)
    os.replace(temporary, path)
  except BaseException:
    Path(temporary).unlink(missing_ok=True)
    raise
