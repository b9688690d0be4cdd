"""Large images never run the command out of memory (issue 13, acceptance 3): 8 pairs of 3000x3000 images with the
default options under a 6 GiB address-space cap."""
import csv
import io
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

import lpips_jax
from lpips_jax.files import read_image

IMAGES = os.path.join(os.path.dirname(lpips_jax.__file__), "images")
CAP = 6 * 2**30
SIDE = 3000


def photo(name: str, seed: int) -> np.ndarray:
  """An example photograph enlarged to SIDE x SIDE, with noise: a large image that is not flat."""
  image = Image.open(os.path.join(IMAGES, f"{name}.png")).convert("RGB").resize((SIDE, SIDE), Image.BILINEAR)
  noise = np.random.default_rng(seed).integers(-12, 13, (SIDE, SIDE, 3), dtype=np.int16)
  return np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)


def test_eight_pairs_of_3000x3000_images_fit_in_6_gib_and_give_the_distances(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir()
  b.mkdir()
  # Four distinct pairs (x, y), and the same four swapped as (y, x) under other names: LPIPS is symmetric, so eight
  # distances are checked against four computed here (each 3000x3000 pair takes ~7 s on a 2-core CPU).
  names = ["ex_ref", "ex_p0", "ex_p1"]
  for i in range(4):
    x, y = photo(names[i % 3], 2 * i), photo(names[(i + 1) % 3], 2 * i + 1)
    for k, (first, second) in enumerate(((x, y), (y, x))):
      Image.fromarray(first).save(a / f"{i + 4 * k}.ppm")  # uncompressed: quick to write and read
      Image.fromarray(second).save(b / f"{i + 4 * k}.ppm")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the default: one CPU device, not the tests' 8
  result = subprocess.run([sys.executable, "-m", "lpips_jax", str(a), str(b)], capture_output=True, env=env,
                          cwd=tempfile.gettempdir(),
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP)))
  assert result.returncode == 0, result.stderr.decode()[-2000:]
  rows = list(csv.DictReader(io.StringIO(result.stdout.decode())))
  assert [r["a"] for r in rows] == [str(a / f"{i}.ppm") for i in range(8)]
  params = lpips_jax.load("alex")
  expected = [float(lpips_jax.distance(params, read_image(a / f"{i}.ppm")[None], read_image(b / f"{i}.ppm")[None])[0])
              for i in range(4)]
  np.testing.assert_allclose([float(r["distance"]) for r in rows], expected * 2, atol=2e-6)
