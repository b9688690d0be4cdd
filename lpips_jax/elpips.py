"""E-LPIPS's deterministic core (Kettunen et al. 2019; docs/variants.md §2): the VGG16 ensemble network and one
fixed transformation of both images of a pair.

Part of issue #17, in progress: the random ensemble (sampling, `n` samples, dropout), the heads' converter and the
entry points come next; nothing public uses this module yet. Its numbers are tested against the reference's
(tests/test_elpips.py, tests/data/elpips_goldens_seeded.json).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lpips_jax.backbones import _VGG16_SLICES, _conv
from lpips_jax.layout import SCALE, SHIFT
from lpips_jax.lpips import unit_normalize

# Channels of the 14 taps: the scaled input, then every conv of VGG16 after its ReLU (A.2).
CHANNELS = (3, *(c for block in _VGG16_SLICES for _, c in block))
OFFSET_MAX = 7  # the reference's offset_max: every offset pads 7 rows and 7 columns in all (B.2)


class VGG16Avg(nn.Module):
  """E-LPIPS's VGG16: torchvision's convolutions (named as `backbones.VGG16`'s, so `load("vgg")["vgg"]` is its
  params), 2x2/2 average pools (sizes rounded down) in place of the max pools; taps: the input and all 13 ReLUs."""

  dtype: Any = None
  precision: Any = None

  @nn.compact
  def __call__(self, z: jax.Array) -> tuple[jax.Array, ...]:
    taps = [z]
    for s, block in enumerate(_VGG16_SLICES):
      if s:  # 2x2/2 average pool, the last odd row and column dropped (TF's VALID)
        n, h, w, c = z.shape
        z = z[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
      for index, features in block:
        z = nn.relu(_conv(features, 3, 1, 1, f"features_{index}", self.dtype, self.precision)(z))
        taps.append(z)
    return tuple(taps)


class Transform(NamedTuple):
  """One transformation of the ensemble (B), the same for both images of each pair. Batch-wide: `scale` (a Python
  int s >= 1), `scale_pad` (py, px) in [0, s), `transpose`; per image: `offset` [N, 2] (dy, dx) in [0, 7], or None
  for no offset step at all; `flip` [N] (0: columns reversed, 1: rows, 2: both, 3: none); `permutation` [N, 3];
  `color_scale` [N, 3]."""

  scale: int
  scale_pad: tuple[int, int]
  offset: Any
  flip: Any
  transpose: bool
  permutation: Any
  color_scale: Any


def transform(t: Transform, x: jax.Array) -> jax.Array:
  """Images `x` [N, H, W, 3] in [0, 1] transformed by `t` (B.1-B.6; the transpose is left to `network_distance`,
  which transposes the kernels instead, B.4)."""
  if t.scale > 1:  # B.1: reflect-pad to a multiple of s (at least s - 1 more), then s x s box means
    s, (py, px) = t.scale, t.scale_pad
    hf, wf = ((n + 2 * s - 2) // s * s for n in x.shape[1:3])
    x = jnp.pad(x, [(0, 0), (py, hf - x.shape[1] - py), (px, wf - x.shape[2] - px), (0, 0)], mode="reflect")
    x = x.reshape(x.shape[0], hf // s, s, wf // s, s, 3).mean(axis=(2, 4))
  if t.offset is not None:  # B.2: 7 - dy rows above and dy below: a window of the image padded by 7 all round
    h, w = x.shape[1:3]
    padded = jnp.pad(x, [(0, 0), (OFFSET_MAX, OFFSET_MAX), (OFFSET_MAX, OFFSET_MAX), (0, 0)], mode="reflect")
    window = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h + OFFSET_MAX, w + OFFSET_MAX, 3))
    x = jax.vmap(window)(padded, jnp.asarray(t.offset))
  flip = jnp.asarray(t.flip)[:, None, None, None]  # B.3
  x = jnp.where((flip == 0) | (flip == 2), x[:, :, ::-1], x)
  x = jnp.where((flip == 1) | (flip == 2), x[:, ::-1], x)
  x = jnp.take_along_axis(x, jnp.asarray(t.permutation)[:, None, None, :], axis=-1)  # B.5
  return x * jnp.asarray(t.color_scale, x.dtype)[:, None, None, :]  # B.6


def network_distance(trunk, heads, a, r, *, transpose=False, per_layer: bool = False):
  """The E-LPIPS network's distance (A) of images `a`, `r` [N, H, W, 3] in [-1, 1] (after `transform` and 2x - 1):
  the sum over the 14 taps of head_l . mean_hw (n_a - n_r)^2, n the unit-normalised tap. `trunk`: VGG16 params
  (`load("vgg")["vgg"]`); `heads`: 14 arrays [C_l]. `transpose` (B.4) runs the network on both images transposed,
  as its convolutions with transposed kernels: every tap is then the transpose of the untransposed one, and the
  spatial means do not see it (average pools of 2x2 round both axes alike)."""
  kernels = jax.tree_util.tree_map_with_path(
      lambda path, w: jnp.where(transpose, w.swapaxes(0, 1), w) if path[-1].key == "kernel" else w, trunk)
  shift, scale = (jnp.asarray(c, a.dtype).reshape(1, 1, 1, 3) for c in (SHIFT, SCALE))
  ta, tr = (VGG16Avg().apply({"params": kernels}, (x - shift) / scale) for x in (a, r))
  terms = []
  for head, fa, fr in zip(heads, ta, tr):
    n_a, n_r = unit_normalize(fa), unit_normalize(fr)
    d = (jnp.maximum(n_a, n_r) - jnp.minimum(n_a, n_r)) ** 2  # symmetric, exactly 0 for equal taps (lpips.py)
    terms.append(jnp.dot(jnp.mean(d, axis=(1, 2)), head, precision=jax.lax.Precision.HIGHEST))
  total = sum(terms[1:], terms[0])
  return (total, terms) if per_layer else total


def fixed_distance(trunk, heads, t: Transform, image, reference, *, per_layer: bool = False):
  """The E-LPIPS network's distance of `image` and `reference` [N, H, W, 3] in [0, 1] under the one transformation
  `t` (dropout off): the deterministic core of one sample."""
  a, r = (2 * transform(t, x) - 1 for x in (image, reference))
  return network_distance(trunk, heads, a, r, transpose=t.transpose, per_layer=per_layer)


def seeded_heads(seed: int = 2024) -> list[np.ndarray]:
  """Heads anyone can rebuild, for tests without the published file: `numpy.random.default_rng(seed)` uniform in
  [0, 1) for each tap in order, as float32 (tests/data/elpips_goldens_seeded.json's `heads`)."""
  rng = np.random.default_rng(seed)
  return [rng.uniform(0.0, 1.0, size=c).astype(np.float32) for c in CHANNELS]
