"""The one image decoder and the one file writer (lpips_jax.files): never clipped, never torn."""
import os
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from lpips_jax.files import ImageFileError, atomic_write, read_image


def write_png16(path, pixels: np.ndarray) -> None:
  """A 16-bit PNG (gray [H, W, 1] or RGB [H, W, 3]) written by hand: Pillow cannot write 16-bit RGB."""
  h, w, c = pixels.shape
  raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
  chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                              + struct.pack(">I", zlib.crc32(kind + data)))
  header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def png_header_only(path, width: int, height: int) -> None:
  """A PNG that declares `width` x `height` pixels: what a decompression bomb looks like before it is decoded."""
  chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                              + struct.pack(">I", zlib.crc32(kind + data)))
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


RNG = np.random.default_rng(0)


def test_8bit_rgb_is_the_official_transform(tmp_path):
  pixels = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "x.png")
  # torchvision ToTensor + Normalize(0.5, 0.5), the official BAPPS transform, in float32
  expected = (pixels.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
  np.testing.assert_array_equal(read_image(tmp_path / "x.png"), expected)


def test_resize_is_pillow_bilinear_on_the_8bit_values(tmp_path):
  pixels = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "x.png")
  resized = np.asarray(Image.fromarray(pixels).resize((30, 20), Image.BILINEAR), np.float32) / 127.5 - 1
  np.testing.assert_array_equal(read_image(tmp_path / "x.png", (30, 20)), resized)
  np.testing.assert_array_equal(read_image(tmp_path / "x.png", lambda w, h: (w // 2, h // 2)), resized)


def test_16bit_gray_png_is_read_at_full_precision_not_clipped(tmp_path):
  values = RNG.integers(0, 65536, (64, 64, 1), dtype=np.uint16)
  write_png16(tmp_path / "g.png", values)
  x = read_image(tmp_path / "g.png")
  assert x.shape == (64, 64, 3)
  np.testing.assert_allclose(x[..., 0], values[..., 0] / 65535 * 2 - 1, atol=1e-6)
  assert len(np.unique(x)) > 256  # more than 8 bits survive
  Image.fromarray(values[..., 0]).save(tmp_path / "g.tif")  # a 16-bit TIFF, the same rule
  np.testing.assert_allclose(read_image(tmp_path / "g.tif"), x, atol=1e-6)


def test_16bit_rgb_png_is_scaled_by_its_range_with_a_note(tmp_path):
  values = RNG.integers(0, 65536, (16, 16, 3), dtype=np.uint16)
  write_png16(tmp_path / "c.png", values)
  notes = []
  x = read_image(tmp_path / "c.png", note=notes.append)
  np.testing.assert_array_equal(x, (values >> 8).astype(np.float32) / 127.5 - 1)  # the top 8 bits, not clipped
  assert len(notes) == 1 and "16 bits per channel" in notes[0] and "c.png" in notes[0]


def test_float_tiff_in_unit_range_is_read_as_is_and_outside_it_refused(tmp_path):
  values = RNG.uniform(0, 1, (12, 12)).astype(np.float32)
  Image.fromarray(values, "F").save(tmp_path / "f.tif")
  np.testing.assert_allclose(read_image(tmp_path / "f.tif")[..., 1], values * 2 - 1, atol=1e-6)
  Image.fromarray(values * 300, "F").save(tmp_path / "big.tif")
  with pytest.raises(ImageFileError, match=r"big.tif: a float image with values in \[.*\]; .* \[0, 1\]"):
    read_image(tmp_path / "big.tif")
  Image.fromarray(np.full((4, 4), np.nan, np.float32), "F").save(tmp_path / "nan.tif")
  with pytest.raises(ImageFileError, match="nan.tif: a float image with values in"):
    read_image(tmp_path / "nan.tif")


def test_converted_modes_are_noted(tmp_path):
  Image.fromarray(RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA").save(tmp_path / "a.png")
  notes = []
  assert read_image(tmp_path / "a.png", note=notes.append).shape == (8, 8, 3)
  assert notes == [f"{tmp_path / 'a.png'} is RGBA, converted to RGB (alpha dropped)"]


@pytest.mark.parametrize("side", [10_000, 20_000])  # above Pillow's limit, and above twice it (Pillow raises)
def test_decompression_bombs_are_refused_before_decoding(tmp_path, side):
  png_header_only(tmp_path / "bomb.png", side, side)
  with pytest.warns(Image.DecompressionBombWarning) if side == 10_000 else _nothing():
    with pytest.raises(ImageFileError, match="bomb.png: more than 89.5 megapixels, Pillow's limit against "
                                             "decompression bombs; .* --max-pixels"):
      read_image(tmp_path / "bomb.png")


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def test_broken_files_name_the_file(tmp_path):
  Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "whole.png")
  data = (tmp_path / "whole.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
  (tmp_path / "text.png").write_text("not an image")
  (tmp_path / "empty.png").write_bytes(b"")
  cases = {"cut.png": "cut.png: not a readable image (", "text.png": "text.png: not a readable image (",
           "empty.png": "empty.png: not a readable image (", "missing.png": "missing.png: no such file"}
  for name, message in cases.items():
    with pytest.raises(ImageFileError) as e:
      read_image(tmp_path / name)
    assert message in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ImageFileError, match="is a directory"):
    read_image(tmp_path)


def test_atomic_write_replaces_the_file_whole(tmp_path):
  path = tmp_path / "sub" / "out.bin"
  atomic_write(path, b"first")
  atomic_write(path, lambda f: f.write(b"second"))
  assert path.read_bytes() == b"second"
  assert oct(path.stat().st_mode & 0o777) == oct(0o644 & ~_umask())
  assert sorted(p.name for p in path.parent.iterdir()) == ["out.bin"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "out.bin"
  atomic_write(path, b"good")

  def fail(f):
    f.write(b"half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError):
    atomic_write(path, fail)
  assert path.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_writer_killed_mid_write_leaves_the_previous_file(tmp_path):
  path = tmp_path / "big.bin"
  atomic_write(path, b"\x01" * 1000)
  writer = textwrap.dedent(f"""
      import sys
      from lpips_jax.files import atomic_write
      import time
      def slow(f):
        f.write(b"\\x02" * 65536)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
      atomic_write({str(path)!r}, slow)
  """)
  for delay in (0.0, 0.1):
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, cwd=tempfile.gettempdir())
    assert process.stdout.readline() == b"writing\n"  # half written
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert path.read_bytes() == b"\x01" * 1000


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask
