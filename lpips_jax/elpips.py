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

from lpips_jax.backbones import NETS, VGG16Avg
from lpips_jax.layout import Variant

CHANNELS = NETS["vgg_ensemble"].channels
LEVELS = VGG16Avg.LEVELS  # each tap's number of 2x2 pools before it
SCALE_LEVELS = 8  # downscalings by 1..8 (the reference's num_scales)
OFFSET_MAX = 7  # offsets 0..7: every offset pads 7 rows and 7 columns in all (B.2)
COLOR_MIN = 0.2  # colour scales are uniform in [0.2, 1)
PERMUTATIONS = np.array(list(itertools.permutations(range(3))), np.int32)  # in the reference's order (C.7)
FLIPS = 4  # 0: columns reversed, 1: rows reversed, 2: both, 3: none
_SCALE_WEIGHTS = 1 / np.arange(1, SCALE_LEVELS + 1) ** 2  # P(s) proportional to 1 / s^2
# The boundaries between the levels' intervals of [0, 1), in units of 2^-24.
_SCALE_CDF = (np.cumsum(_SCALE_WEIGHTS)[:-1] / _SCALE_WEIGHTS.sum() * 2**24).astype(np.uint32)


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
  permutation m times, and each channel's colour scales take one value from each of the n equal strata.

  Every value comes from one draw of 32-bit words (`jax.random.bits`): a draw per field compiled to a few hundred
  small kernels, about 1 s of each E-LPIPS program's compile time on CPU. Integers in [0, m) are the top 24 bits
  times m, shifted down 24 (exact; each value's probability within m / 2^24 of 1 / m); the shuffles are one stable
  sort of five rows by 64-bit random keys (ties have probability below 2^-40 per pair of entries)."""
  flips, perms = FLIPS * -(-n // FLIPS), 6 * -(-n // 6)  # whole cycles of the stratified values, shuffled, cut to n
  width = max(flips, perms)
  words = jax.random.bits(key, (4 + 5 * n + 10 * width,), jnp.uint32)
  top = words[:4 + 5 * n] >> 8  # 24 random bits each
  below = lambda bits, m: ((bits * jnp.asarray(m).astype(jnp.uint32)) >> 24).astype(jnp.int32)  # uniform in [0, m)
  scale = 1 + jnp.sum(top[0] >= _SCALE_CDF).astype(jnp.int32)
  scale_pad = below(top[1:3], scale)
  offset = below(top[3:3 + 2 * n], OFFSET_MAX + 1).reshape(n, 2)
  transpose = top[3 + 2 * n] >= 2**23
  jitter = top[4 + 2 * n:].reshape(3, n).astype(dtype) / 2**24  # uniform in [0, 1)
  # Five shuffles (flips, three channels' strata, permutations), each the order of random 64-bit keys; entries past
  # a row's length sort last.
  hi, lo = words[4 + 5 * n:].reshape(2, 5, width)
  length = np.array([flips, n, n, n, perms])[:, None]
  past = np.arange(width)[None, :] >= length
  hi, lo = (jnp.where(past, np.uint32(2**32 - 1), k) for k in (hi, lo))
  _, _, order = jax.lax.sort((hi, lo, jnp.broadcast_to(jnp.arange(width), (5, width))), num_keys=2)
  flip = jnp.asarray(np.arange(flips) % FLIPS)[order[0, :n]]  # the first n of the shuffled cycles
  strata = (jitter + jnp.arange(n, dtype=dtype)[None, :]) / n  # [3, n]: one value in each stratum, in order
  color_scale = COLOR_MIN + (1 - COLOR_MIN) * jnp.take_along_axis(strata, order[1:4, :n], axis=1).T
  permutation = jnp.asarray(np.tile(PERMUTATIONS, (perms // 6, 1)))[order[4, :n]]
  return Transform(scale, scale_pad, offset, flip, transpose, permutation, color_scale)


def network_input(t: Transform, images: tuple[jax.Array, ...], small: bool) -> tuple[tuple[jax.Array, ...], tuple]:
  """Images [N, H, W, 3] in [0, 1] (each of `images`, all of one shape) transformed by `t` (B.1-B.3, B.5, B.6; the
  transposition, B.4, is left to `transposed`), on a canvas of fixed size whatever the scale level, with the valid
  rows and columns (n, m).

  The scale level decides the transformed image's size, `(H + 2s - 2) // s + 7` rows, so the image is written into
  the top left of a canvas of the largest size it can have: `full` (H + 7 rows, s = 1) or `small` (s >= 2: s = 2's
  size); the network masks the rest (`backbones.VGG16Avg`). Each axis is one matrix per image [canvas, size]: row y
  is the box mean of s rows of the reflect-padded image (B.1), read through the offset's reflect-padded window (B.2)
  and the flip (B.3); the canvas is then one product per image, `rows @ x @ cols^T`, at full float32 precision.
  The matrices are built once and serve every one of `images` (a pair's two images get the same transformation).
  """
  x = images[0]
  offset = jnp.zeros((x.shape[0], 2), int) if t.offset is None else jnp.asarray(t.offset)
  pad = 0 if t.offset is None else OFFSET_MAX  # None: the reference's network without the offset step
  flip = jnp.asarray(t.flip)
  rows, n = _axis(x.shape[1], small, pad, t.scale, t.scale_pad[0], offset[:, 0], (flip == 1) | (flip == 2), x.dtype)
  cols, m = _axis(x.shape[2], small, pad, t.scale, t.scale_pad[1], offset[:, 1], (flip == 0) | (flip == 2), x.dtype)
  permutation = jnp.asarray(t.permutation)[:, None, None, :]
  colour = jnp.asarray(t.color_scale, x.dtype)[:, None, None, :]

  def one(x):
    x = jnp.einsum("nyh,nhwc,nxw->nyxc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)
    return jnp.take_along_axis(x, permutation, axis=-1) * colour  # B.5, B.6

  return tuple(map(one, images)), (n, m)


def canvas(size: int, small: bool, pad: int = OFFSET_MAX) -> int:
  """The canvas's length along an axis of `size` pixels: the transformed length at s = 1, or at s = 2 (`small`)."""
  return (size + 2) // 2 + pad if small else size + pad


def _axis(size: int, small: bool, pad: int, s, scale_pad, offset, flip, dtype) -> tuple[jax.Array, jax.Array]:
  """The [N, canvas, size] matrix of one axis (`network_input`) and the valid length n."""
  s = jnp.asarray(s)
  scaled = (size + 2 * s - 2) // s  # B.1's length: reflect-padded to a multiple of s, at least s - 1 more
  n = scaled + pad
  y = jnp.arange(canvas(size, small, pad))[None, :]
  y = jnp.where(flip[:, None], n - 1 - y, y)  # B.3 [N, L]
  i = _reflect(y - pad + offset[:, None], scaled)  # B.2: the window starts pad - offset before the image
  a = jnp.arange(SCALE_LEVELS)[None, None, :]
  source = _reflect(i[..., None] * s + a - scale_pad, size)  # B.1: row i averages padded rows i s .. i s + s - 1
  weights = (jnp.where(a < s, 1.0, 0.0).astype(dtype) / s.astype(dtype))[..., None]  # [1, 1, 8, 1]
  hits = (source[..., None] == jnp.arange(size)[None, None, None, :]).astype(weights.dtype)
  matrix = jnp.sum(hits * weights, axis=-2)
  return jnp.where((jnp.arange(matrix.shape[1]) < n)[None, :, None], matrix, 0.0), n


def _reflect(i, n):
  """Index `i` of an axis of length n reflect-padded (the edge not repeated; one reflection, as every pad here is
  shorter than the axis)."""
  return jnp.where(i < 0, -i, jnp.where(i >= n, 2 * (n - 1) - i, i))


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


def transformed_distance(v: Variant, params, t: Transform, a01, b01, *, small: bool, dropout=None,
                         per_layer: bool = False, dtype=None, precision=None, remat: bool = False):
  """The LPIPS pipeline (`lpips.pipeline`'s steps) of images `a01`, `b01` [N, H, W, 3] in [0, 1] under the one
  transformation `t` on the `small` canvas (s >= 2) or the full one (`network_input`), with dropout masks drawn
  from `dropout` (None: no dropout, the deterministic core the reference's goldens pin)."""
  from lpips_jax.lpips import compare, trunk_taps  # lpips imports this module

  (a, b), valid = network_input(t, (a01, b01), small)
  p, (a, b) = transposed(params, v.net, (2 * a - 1, 2 * b - 1), t.transpose)
  # Both images in one trunk call (they share its dropout masks): half the program of two calls to compile. The
  # rows of one call compute alike, so d(x, x) is 0 and d(a, b) = d(b, a).
  taps = trunk_taps(v, p, jnp.concatenate([a, b]), False, dtype, precision, remat, dropout, mask_groups=2,
                    valid=valid)
  n = a.shape[0]
  return compare(v, p, [x[:n] for x in taps], [x[n:] for x in taps], raw=True, per_layer=per_layer, remat=remat,
                 areas=areas(valid))


def areas(valid) -> list:
  """The valid area of each tap (`network_input`'s valid size, halved, rounded down, at each pool)."""
  return [((valid[0] // 2**level) * (valid[1] // 2**level)).astype(jnp.float32) for level in LEVELS]


def one_sample(v: Variant, params, a01, b01, key, **options):
  """One sample of E-LPIPS for images `a01`, `b01` [N, H, W, 3] in [0, 1]: the transformation and dropout masks
  drawn from `key`, then `transformed_distance` on the canvas its scale level needs (two branches, both compiled,
  one run: at s >= 2 the network runs on a quarter of the pixels)."""
  t, dropout = drawn(key, a01.shape[0], a01.dtype)
  at = lambda small: lambda params, t, a01, b01, dropout: transformed_distance(
      v, params, t, a01, b01, small=small, dropout=dropout, **options)
  return jax.lax.cond(t.scale > 1, at(True), at(False), params, t, a01, b01, dropout)


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
  from lpips_jax.lpips import to_float

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


def sample_taps(v: Variant, params, x, key, **options) -> tuple[jax.Array, ...]:
  """The raw taps of images `x` under sample 0 of `key`, as `distance`'s first sample draws it for a batch of
  len(x) pairs (`taps_under`). `key` must be concrete: the scale level decides the taps' shapes."""
  from lpips_jax.lpips import to_float

  t, dropout = drawn(sample_key(key, 0), len(x), to_float(x).dtype)
  return taps_under(v, params, x, t, int(t.scale), dropout, **options)


@functools.partial(jax.jit, static_argnums=(0, 4), static_argnames=("normalize", "dtype", "precision", "remat",
                                                                     "shared"))
def taps_under(v: Variant, params, x, t: Transform, scale: int, dropout, *, normalize: bool, dtype=None,
               precision=None, remat: bool = False, shared: bool = False) -> tuple[jax.Array, ...]:
  """The raw taps of images `x` [N, H, W, 3] under transformation `t` at its scale level `scale` (a Python int: the
  taps are cut to their valid size) and the dropout masks of `dropout`, in the orientation of `x`. `shared`: `t` was
  drawn for one pair, and every image gets it and the same masks, so that any two images of `x` form a pair of that
  sample (`pairwise`)."""
  from lpips_jax.lpips import to_float, trunk_taps

  x01 = to_float(x) if normalize else (to_float(x) + 1) / 2
  if shared:
    t = t._replace(**{f: jnp.broadcast_to(getattr(t, f), (len(x), *jnp.shape(getattr(t, f))[1:])) for f in
                      ("offset", "flip", "permutation", "color_scale")})
  (z,), valid = network_input(t._replace(scale=scale), (x01,), scale > 1)
  p, (z,) = transposed(params, v.net, (2 * z - 1,), t.transpose)
  taps = trunk_taps(v, p, z, False, dtype, precision, remat, dropout, mask_groups=len(x) if shared else 1,
                    valid=valid)
  n, m = ((size + 2 * scale - 2) // scale + OFFSET_MAX for size in x.shape[1:3])
  return tuple(tap[:, :n // 2**level, :m // 2**level] for tap, level in zip(taps, LEVELS))


def seeded_heads(seed: int = 2024) -> list[np.ndarray]:
  """Heads anyone can rebuild, for tests without the published file: `numpy.random.default_rng(seed)` uniform in
  [0, 1) for each tap in order, as float32 (tests/data/elpips_goldens_seeded.json's `heads`)."""
  rng = np.random.default_rng(seed)
  return [rng.uniform(0.0, 1.0, size=c).astype(np.float32) for c in CHANNELS]
