"""bfloat16 trunks keep LPIPS's decisions: 2AFC choices on real photographs agree with float32."""
import numpy as np
import pytest

import lpips_jax
from lpips_jax.train.synthetic import distort

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")


# The distortions of these triplets (those of the synthetic training set, milder and without pixelation).
STRENGTHS = {"noise": (5, 40), "blur": (0.5, 2.5), "jpeg": (5, 40), "contrast": (0.4, 1.6), "colour": (-40, 40)}


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
    p0.append(distort(patch, list(STRENGTHS)[int(rng.integers(5))], rng, STRENGTHS))
    p1.append(distort(patch, list(STRENGTHS)[int(rng.integers(5))], rng, STRENGTHS))
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
