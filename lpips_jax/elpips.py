"""E-LPIPS (Kettunen, Härkönen & Lehtinen 2019; docs/variants.md §2): the LPIPS pipeline averaged over random
transformations of both images of a pair.

Each sample draws one transformation from a `jax.random` key (`sample`): a box downscaling by s in 1..8 (P(s) ∝
1/s²), integer offsets with reflect padding, flips, a transposition, a colour permutation and per-channel colour
scales, plus dropout of every conv input inside the network; both images of a pair get the same transformation and
the same dropout masks. The network is VGG16 with average pools and 14 heads (`backbones.VGG16Avg`), and each
sample's distance is `lpips.pipeline`'s: taps -> unit normalisation -> weighted squared differences -> spatial
means -> sum. The distance is the mean over `samples` samples.

Which parts are drawn once per batch and which per image follows the reference (§2 C): the scale level, its padding
and the transposition are shared by the whole batch; offsets, flips, permutations and colour scales are drawn per
image, flips, permutations and colour scales stratified across the batch.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lpips_jax.backbones import NETS
from lpips_jax.layout import Variant

CHANNELS = NETS["vgg_ensemble"].channels
SCALE_LEVELS = 8  # downscalings by 1..8 (the reference's num_scales)
OFFSET_MAX = 7  # offsets 0..7: every offset pads 7 rows and 7 columns in all (B.2)
COLOR_MIN = 0.2  # colour scales are uniform in [0.2, 1)
PERMUTATIONS = np.array(list(itertools.permutations(range(3))), np.int32)  # in the reference's order (C.7)
FLIPS = 4  # 0: columns reversed, 1: rows reversed, 2: both, 3: none


class Transform(NamedTuple):
  """One transformation of the ensemble (§2 B), the same for both images of each pair. Batch-wide: `scale` s >= 1,
  `scale_pad` (py, px) in [0, s), `transpose`; per image: `offset` [N, 2] (dy, dx) in [0, 7] (None: no offset
  step, for the reference's untransformed network), `flip` [N], `permutation` [N, 3], `color_scale` [N, 3]. Fields
  are Python numbers or (traced) arrays."""

  scale: Any
  scale_pad: Any
  offset: Any
  flip: Any
  transpose: Any
  permutation: Any
  color_scale: Any


def sample(key: jax.Array, n: int, dtype=jnp.float32) -> Transform:
  """The transformation of one sample for a batch of `n` pairs, drawn as the reference draws it (§2 C): the scale
  level, its padding and the transposition once for the batch; offsets per image; flips, permutations and colour
  scales per image but stratified: over a batch of 4m images each flip occurs m times, over 6m images each
  permutation m times, and each channel's colour scales take one value from each of the n equal strata."""
  keys = jax.random.split(key, 6)
  weights = 1 / np.arange(1, SCALE_LEVELS + 1) ** 2
  scale = 1 + jax.random.choice(keys[0], SCALE_LEVELS, p=jnp.asarray(weights / weights.sum(), jnp.float32))
  scale_pad = jax.random.randint(keys[1], (2,), 0, scale)
  offset = jax.random.randint(keys[2], (n, 2), 0, OFFSET_MAX + 1)
  flip = jax.random.permutation(keys[3], np.arange(FLIPS * -(-n // FLIPS)) % FLIPS)[:n]
  transpose = jax.random.bernoulli(keys[4])
  colour, permutation = jax.random.split(keys[5])
  strata = lambda k: jax.random.permutation(k, (jax.random.uniform(k, (n,), dtype) + jnp.arange(n, dtype=dtype)) / n)
  color_scale = COLOR_MIN + (1 - COLOR_MIN) * jnp.stack([strata(k) for k in jax.random.split(colour, 3)], axis=-1)
  permutation = jax.random.permutation(permutation, np.tile(PERMUTATIONS, (-(-n // 6), 1)), axis=0)[:n]
  return Transform(scale, scale_pad, offset, flip, transpose, permutation, color_scale)


def transform(t: Transform, x: jax.Array, scale: int) -> jax.Array:
  """Images `x` [N, H, W, 3] in [0, 1] transformed by `t` at its scale level `scale` (a Python int, as it decides
  the output's shape): B.1-B.3, B.5, B.6. The transposition (B.4) is left to the caller."""
  if scale > 1:  # B.1: reflect-pad to a multiple of s (py rows above), then s x s box means
    s = scale
    h, w = x.shape[1:3]
    hf, wf = ((n + 2 * s - 2) // s * s for n in (h, w))
    # The most padding any (py, px) needs, then the window that starts py rows and px columns above the image.
    x = jnp.pad(x, [(0, 0), (s - 1, hf - h), (s - 1, wf - w), (0, 0)], mode="reflect")
    py, px = (s - 1 - jnp.asarray(p) for p in (t.scale_pad[0], t.scale_pad[1]))
    x = jax.lax.dynamic_slice(x, (0, py, px, 0), (x.shape[0], hf, wf, 3))
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


def transposed(params, net: str, images: tuple[jax.Array, ...], swap) -> tuple[dict, tuple[jax.Array, ...]]:
  """The params and images with which the network sees `images` transposed when `swap` (B.4). Square images are
  transposed; other shapes would change, so the network's kernels are transposed instead (a convolution of the
  transposed image is the transpose of one with transposed kernels; 2x2 pools floor both axes alike, and spatial
  means do not see the orientation)."""
  if images[0].shape[1] == images[0].shape[2]:
    return params, tuple(jnp.where(swap, x.swapaxes(1, 2), x) for x in images)
  swap_kernels = lambda trunk: jax.tree_util.tree_map_with_path(
      lambda path, w: w.swapaxes(0, 1) if path[-1].key == "kernel" else w, trunk)
  trunk = jax.lax.cond(swap, swap_kernels, lambda trunk: trunk, params[net])
  return {**params, net: trunk}, images


def transformed_distance(v: Variant, params, t: Transform, scale: int, a01, b01, *, dropout=None,
                         per_layer: bool = False, dtype=None, precision=None, remat: bool = False):
  """The LPIPS pipeline (`lpips.pipeline`'s steps) of images `a01`, `b01` [N, H, W, 3] in [0, 1] under the one
  transformation `t` at its scale level `scale`, with dropout masks drawn from `dropout` (None: no dropout, the
  deterministic core the reference's goldens pin)."""
  from lpips_jax.lpips import compare, trunk_taps  # lpips imports this module

  p, (a, b) = transposed(params, v.net, tuple(2 * transform(t, x, scale) - 1 for x in (a01, b01)), t.transpose)
  # Both images in one trunk call (they share its dropout masks): half the program of two calls to compile, for
  # each of the eight scale levels. The rows of one call compute alike, so d(x, x) is 0 and d(a, b) = d(b, a).
  taps = trunk_taps(v, p, jnp.concatenate([a, b]), False, dtype, precision, remat, dropout, mask_groups=2)
  n = a.shape[0]
  return compare(v, p, [x[:n] for x in taps], [x[n:] for x in taps], raw=True, per_layer=per_layer, remat=remat)


def one_sample(v: Variant, params, a01, b01, key, **options):
  """One sample of E-LPIPS for images `a01`, `b01` [N, H, W, 3] in [0, 1]: the transformation and dropout masks
  drawn from `key`, then `transformed_distance`. The scale level decides the shapes, so each level is a branch of
  its own (all compiled, one run)."""
  t, dropout = drawn(key, a01.shape[0], a01.dtype)

  def at(scale: int):
    return lambda params, t, a01, b01, dropout: transformed_distance(v, params, t, scale, a01, b01, dropout=dropout,
                                                                      **options)

  return jax.lax.switch(t.scale - 1, [at(s) for s in range(1, SCALE_LEVELS + 1)], params, t, a01, b01, dropout)


def drawn(key: jax.Array, n: int, dtype=jnp.float32) -> tuple[Transform, jax.Array]:
  """The transformation (for a batch of `n` pairs) and the dropout masks' key of the sample with key `key`."""
  t_key, dropout = jax.random.split(key)
  return sample(t_key, n, dtype), dropout


def sample_key(key: jax.Array, i) -> jax.Array:
  """The key of sample `i` of a call with `key`."""
  return jax.random.fold_in(key, i)


@functools.partial(jax.jit, static_argnames=("variant", "samples", "per_layer", "normalize", "dtype", "precision",
                                             "remat"))
def pipeline(params, a, b, key, *, variant: Variant, samples: int, per_layer: bool, normalize: bool, dtype=None,
             precision=None, remat: bool = False):
  """E-LPIPS of checked params and images: the mean of `samples` samples (`one_sample`), accumulated one sample at
  a time, so memory does not grow with `samples`; the gradient recomputes each sample's forward pass rather than
  keep all of them."""
  a01, b01 = (x if normalize else (x + 1) / 2 for x in (to_float(a), to_float(b)))
  one = functools.partial(one_sample, variant, per_layer=per_layer, dtype=dtype, precision=precision, remat=remat)
  if samples == 1:
    return one(params, a01, b01, sample_key(key, 0))

  def step(total, i):
    d = jax.checkpoint(one, prevent_cse=False)(params, a01, b01, sample_key(key, i))
    return jax.tree.map(jnp.add, total, d), None

  zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(one, params, a01, b01, sample_key(key, 0)))
  total, _ = jax.lax.scan(step, zero, jnp.arange(samples))
  return jax.tree.map(lambda x: x / samples, total)


def to_float(x) -> jax.Array:
  """float32, or float64 for float64 inputs: the metric never computes below float32."""
  x = jnp.asarray(x)
  return x.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)


def sample_taps(v: Variant, params, x, key, **options) -> tuple[jax.Array, ...]:
  """The raw taps of images `x` under sample 0 of `key`, as `distance`'s first sample draws it for a batch of
  len(x) pairs (`taps_under`). `key` must be concrete: the scale level decides the taps' shapes."""
  t, dropout = drawn(sample_key(key, 0), len(x), to_float(x).dtype)
  return taps_under(v, params, x, t, int(t.scale), dropout, **options)


@functools.partial(jax.jit, static_argnums=(0, 4), static_argnames=("normalize", "dtype", "precision", "remat",
                                                                     "shared"))
def taps_under(v: Variant, params, x, t: Transform, scale: int, dropout, *, normalize: bool, dtype=None,
               precision=None, remat: bool = False, shared: bool = False) -> tuple[jax.Array, ...]:
  """The raw taps of images `x` [N, H, W, 3] under transformation `t` at its scale level `scale` (a Python int) and
  the dropout masks of `dropout`, in the orientation of `x`. `shared`: `t` was drawn for one pair, and every image
  gets it and the same masks, so that any two images of `x` form a pair of that sample (`pairwise`)."""
  from lpips_jax.lpips import trunk_taps

  x01 = to_float(x) if normalize else (to_float(x) + 1) / 2
  if shared:
    t = t._replace(**{f: jnp.broadcast_to(getattr(t, f), (len(x), *jnp.shape(getattr(t, f))[1:])) for f in
                      ("offset", "flip", "permutation", "color_scale")})
  p, (z,) = transposed(params, v.net, (2 * transform(t, x01, scale) - 1,), t.transpose)
  return trunk_taps(v, p, z, False, dtype, precision, remat, dropout, mask_groups=len(x) if shared else 1)


def seeded_heads(seed: int = 2024) -> list[np.ndarray]:
  """Heads anyone can rebuild, for tests without the published file: `numpy.random.default_rng(seed)` uniform in
  [0, 1) for each tap in order, as float32 (tests/data/elpips_goldens_seeded.json's `heads`)."""
  rng = np.random.default_rng(seed)
  return [rng.uniform(0.0, 1.0, size=c).astype(np.float32) for c in CHANNELS]
