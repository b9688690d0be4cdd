"""The lpips-jax command: two images, two directories, all pairs, heat maps, and one-line errors."""
import csv
import io
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


def run(*args, cwd=None):
  return subprocess.run([sys.executable, "-m", "lpips_jax.cli", *map(str, args)], capture_output=True, text=True,
                        cwd=cwd)


def test_two_images_print_their_distance():
  result = run(IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", IMAGES / "ex_p1.png")
  assert result.returncode == 0, result.stderr
  values = [float(line.split("\t")[1]) for line in result.stdout.splitlines()]
  ref, p0, p1 = (load_image(n) for n in ("ex_ref", "ex_p0", "ex_p1"))
  expected = lpips_jax.distance(lpips_jax.load("alex"), np.concatenate([ref, ref]), np.concatenate([p0, p1]))
  np.testing.assert_allclose(values, expected, atol=1e-6)
  np.testing.assert_allclose(values, [0.721881, 0.137566], atol=1e-5)  # ENVIRONMENT.md §3


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
  rows = list(csv.DictReader(open(tmp_path / "out.csv")))
  assert [r["a"].split("/")[-1] for r in rows] == ["ex_p0.png", "ex_p1.png", "ex_ref.png"]
  np.testing.assert_allclose([float(r["distance"]) for r in rows[:2]], [0.711048, 0.147902], atol=1e-5)
  assert "batch/s" in result.stderr or "it/s" in result.stderr or "100%" in result.stderr  # tqdm on stderr
  assert "converted to RGB" in result.stderr


def test_one_directory_gives_all_pairs(folders):
  a, _ = folders
  result = run(a)
  assert result.returncode == 0, result.stderr
  rows = list(csv.DictReader(io.StringIO(result.stdout)))
  assert len(rows) == 3 and {(r["a"][-9:], r["b"][-10:]) for r in rows} >= {("ex_p0.png", "ex_ref.png")}


def test_spatial_heat_map_is_written_and_drawn_from_the_distance_map(tmp_path):
  out = tmp_path / "map.png"
  result = run(IMAGES / "ex_ref.png", IMAGES / "ex_p1.png", "--spatial", out)
  assert result.returncode == 0, result.stderr
  assert Image.open(out).size == (3 * 64, 64)
  params = lpips_jax.load("alex")
  d_map = cli.heat_map(params, IMAGES / "ex_ref.png", IMAGES / "ex_p1.png", tmp_path / "again.png", resize=False)
  scalar = float(result.stdout.split("\t")[1])
  assert abs(d_map.mean() - scalar) <= 0.05 * scalar


def test_sizes_must_match_unless_resized(tmp_path):
  Image.open(IMAGES / "ex_p0.png").resize((80, 72)).save(tmp_path / "big.png")
  result = run(IMAGES / "ex_ref.png", tmp_path / "big.png")
  assert result.returncode != 0 and "--resize" in result.stderr
  assert run(IMAGES / "ex_ref.png", tmp_path / "big.png", "--resize").returncode == 0


@pytest.mark.parametrize("bad", ["missing", "not-an-image", "empty-dir", "tiny"])
def test_bad_inputs_exit_non_zero_with_one_line(bad, tmp_path):
  if bad == "missing":
    args = [IMAGES / "ex_ref.png", tmp_path / "nope.png"]
  elif bad == "not-an-image":
    (tmp_path / "fake.png").write_text("hello")
    args = [IMAGES / "ex_ref.png", tmp_path / "fake.png"]
  elif bad == "empty-dir":
    args = [tmp_path]
  else:
    Image.new("RGB", (20, 20)).save(tmp_path / "t1.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "t2.png")
    args = [tmp_path / "t1.png", tmp_path / "t2.png"]
  result = run(*args)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("lpips-jax: error:"), result.stderr
