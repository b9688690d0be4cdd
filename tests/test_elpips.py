"""E-LPIPS's deterministic core against the numbers of its reference (mkettune/elpips, TensorFlow), computed outside
this repository for fixed transformations, dropout off (tests/data/elpips_goldens_seeded.json: its `provenance`
says how; docs/variants.md §2 says what each step does)."""
import functools
import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import lpips_jax
from lpips_jax import elpips

GOLDENS = json.loads((Path(__file__).parent / "data" / "elpips_goldens_seeded.json").read_text())
IMAGES = Path(lpips_jax.__file__).parent / "images"


@functools.cache
def pairs() -> dict:
  """The goldens' image pairs (`pairs` in the JSON): (image, reference), each [1, H, W, 3] float64 in [0, 1]."""
  from skimage import data

  ex = {n: np.asarray(Image.open(IMAGES / f"{n}.png").convert("RGB"), np.float64) / 255 for n in
        ("ex_ref", "ex_p0", "ex_p1")}
  astronaut = data.astronaut()
  crop = astronaut[100:196, 150:230]
  out = {"ex_p0": (ex["ex_p0"], ex["ex_ref"]), "ex_p1": (ex["ex_p1"], ex["ex_ref"]),
         "ex_p0_crop64x48": (ex["ex_p0"][:, 8:56], ex["ex_ref"][:, 8:56]),
         "ex_p1_crop64x48": (ex["ex_p1"][:, 8:56], ex["ex_ref"][:, 8:56]),
         "astronaut_shift": (astronaut[103:199, 152:232] / 255, crop / 255),
         "astronaut_quant16": ((crop // 16 * 16 + 8) / 255, crop / 255)}
  return {name: tuple(x[None] for x in pair) for name, pair in out.items()}


def transform_of(entry: dict) -> elpips.Transform:
  return elpips.Transform(entry["scale"], tuple(entry["scale_pad"]), entry["offset"], entry["flip"],
                          entry["transpose"], entry["permutation"], entry["color_scale"])


# Every transformation (each scale level 1-8, offsets, flips, transposition, permutations, colour scales) on a
# 64x64 pair and a non-square photograph; the other pairs with fewer, for time.
EVERY = ("ex_p0", "astronaut_shift")
SOME = ("identity", "t02", "t03", "t07", "t11")


def cases():
  for pair, by_transform in GOLDENS["vgg"].items():
    for name, golden in by_transform.items():
      if golden["total"] is not None and (pair in EVERY or name in SOME):  # null: the reference failed or gave NaN
        yield pytest.param(pair, name, golden, id=f"{pair}-{name}")


def test_the_seeded_heads_are_the_goldens():
  heads = elpips.seeded_heads()
  assert [h.size for h in heads] == GOLDENS["heads"]["channels"] == list(elpips.CHANNELS)
  digest = hashlib.sha256(b"".join(h.astype("<f4").tobytes() for h in heads)).hexdigest()
  assert digest == GOLDENS["heads"]["sha256_of_concatenated_float32"]


@pytest.mark.parametrize("pair, name, golden", list(cases()))
def test_the_network_under_a_fixed_transformation_is_the_references(pair, name, golden):
  """Float64, as the goldens: the per-layer values and the total within 1e-5 (relative) of the reference's."""
  transform = transform_of(next(t for t in GOLDENS["transforms"] if t["name"] == name))
  with jax.enable_x64(True):
    trunk = jax.tree.map(lambda w: np.asarray(w, np.float64), lpips_jax.load("vgg", device="numpy")["vgg"])
    heads = [h.astype(np.float64) for h in elpips.seeded_heads()]
    total, layers = elpips.fixed_distance(trunk, heads, transform, *pairs()[pair], per_layer=True)
  np.testing.assert_allclose(np.asarray(layers)[:, 0], golden["layers"], rtol=1e-5, atol=1e-9)
  assert abs(float(total[0]) - golden["total"]) <= 1e-5 * abs(golden["total"])


def test_the_input_gradient_is_finite_and_the_distance_symmetric_and_zero_on_equal_images():
  t = transform_of(next(t for t in GOLDENS["transforms"] if t["name"] == "t03"))  # scale 3, flips, transpose
  trunk, heads = lpips_jax.load("vgg")["vgg"], elpips.seeded_heads()
  image, reference = (x.astype(np.float32) for x in pairs()["ex_p0"])
  distance = jax.jit(lambda trunk, heads, x, y: elpips.fixed_distance(trunk, heads, t, x, y))
  grad = jax.jit(jax.grad(lambda x, trunk, heads: distance(trunk, heads, x, reference).sum()))(image, trunk, heads)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
  d = distance(trunk, heads, image, reference)
  np.testing.assert_array_equal(distance(trunk, heads, reference, image), d)
  assert not np.asarray(distance(trunk, heads, image, image)).any()
