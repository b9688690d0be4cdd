"""The LPIPS trunks as linen modules: port of torchvision's `features` stacks, cut at the LPIPS taps.

Each module maps NHWC images to the tuple of post-ReLU activations that the official `lpips.pn.{alexnet,vgg16,
squeezenet}` slices return (docs/official.md §1.3), or, for the shift-tolerant ST-LPIPS trunks, that
`stlpips_pytorch.invariant_networks.{alexnet,vggnet}(variant="shift_tolerant")` return (docs/variants.md §1).
Convolutions are named `features_{i}` after the reference's `features.{i}`, so converting a torch state dict is a
rename plus an OIHW -> HWIO transpose.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lpips_jax.errors import InputError


def _conv(features: int, kernel: int, stride: int, pad: int, name: str, dtype, precision) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=[(pad, pad)] * 2, dtype=dtype,
                 precision=precision, name=name)


class _Trunk(nn.Module):
  """A trunk runs its LPIPS slices in order, each slice's output being a tap and the next slice's input. Each trunk
  defines its layers as `slice(x, s)` and their number as `slices`.

  Attributes: `dtype`, the compute dtype; `precision`, the XLA convolution precision; `remat`, rematerialise each
  slice in the backward pass (see `_remat`).
  """

  dtype: Any = None
  precision: Any = None
  remat: bool = False
  slices = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    run, taps = _remat(type(self).slice, self.remat), []
    for s in range(self.slices):
      taps.append(x := run(self, x, s))
    return tuple(taps)


def _remat(method, remat: bool):
  """The slice method, rematerialised on its own if `remat`: the backward pass then saves only the taps (which the
  distance keeps anyway) and holds one slice's inner activations at a time; rematerialising the trunk as one
  block would recompute all of them at once and save nothing."""
  return nn.remat(method, static_argnums=(2,)) if remat else method


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int, stride: int, ceil_mode: bool = False) -> jax.Array:
  """torch `MaxPool2d(window, stride, ceil_mode)` on NHWC, as the elementwise maximum of the window's strided views.

  Not `nn.max_pool`: on XLA's CPU backend its reduce_window, and the select_and_scatter of its gradient, are slower
  than slices and maxima (bench/pools.py; the README has the numbers); the values are the same (a maximum is exact).
  ceil_mode (SqueezeNet): out = ceil((H - window) / stride) + 1, minus one when the last window would start past
  the input; the missing bottom/right cells are -inf.

  Its derivative is torch's: each window's tangent is the one at its first maximum, in row-major order
  (`_max_pool_jvp`). Differentiating the chain of maxima instead split ties in halves and kept every partial
  maximum for the backward pass: the gradient programs compiled 11-27% slower and ran up to 30% slower on CPU.
  """
  return functools.reduce(jnp.maximum, _pool_views(x, window, stride, ceil_mode, -jnp.inf))


def _pool_views(x: jax.Array, window: int, stride: int, ceil_mode: bool, fill) -> list[jax.Array]:
  """The window*window strided views of `x` whose elementwise maximum is the pool, in row-major window order; with
  ceil_mode, `x` is first padded at the bottom and right with `fill` where the last windows overhang it."""
  out = []
  for size in x.shape[1:3]:
    n = (size - window) // stride + 1
    if ceil_mode:
      n = -(-(size - window) // stride) + 1
      if (n - 1) * stride >= size:
        n -= 1
    out.append(n)
  need = [(n - 1) * stride + window for n in out]
  if ceil_mode and any(k > size for k, size in zip(need, x.shape[1:3])):
    pads = [(0, 0)] + [(0, max(k - size, 0)) for k, size in zip(need, x.shape[1:3])] + [(0, 0)]
    x = jnp.pad(x, pads, constant_values=fill)
  return [jax.lax.slice(x, (0, i, j, 0), (x.shape[0], i + (out[0] - 1) * stride + 1, j + (out[1] - 1) * stride + 1,
                                          x.shape[3]), (1, stride, stride, 1))
          for i in range(window) for j in range(window)]


@max_pool.defjvp
def _max_pool_jvp(window, stride, ceil_mode, primals, tangents):
  """The tangent of each window at its first maximum: a sum of masked views, linear in the tangent, so the gradient
  is its transpose (each view's mask padded back into place) and higher derivatives exist (the masks are constant
  where they are defined)."""
  (x,), (t,) = primals, tangents
  y = max_pool(x, window, stride, ceil_mode)
  taken, out = None, None
  for x_view, t_view in zip(_pool_views(x, window, stride, ceil_mode, -jnp.inf),
                            _pool_views(t, window, stride, ceil_mode, 0)):
    first = x_view == y if taken is None else (x_view == y) & ~taken
    taken = first if taken is None else taken | first
    term = jnp.where(first, t_view, 0)
    out = term if out is None else out + term
  return y, out


# (torchvision index, output channels, kernel, stride, padding, max pool first) of each LPIPS slice's conv.
_ALEXNET_SLICES = ((0, 64, 11, 4, 2, False), (3, 192, 5, 1, 2, True), (6, 384, 3, 1, 1, True),
                   (8, 256, 3, 1, 1, False), (10, 256, 3, 1, 1, False))


class AlexNet(_Trunk):
  """torchvision `alexnet().features[:12]`; taps relu1..relu5 (64, 192, 384, 256, 256 channels)."""

  slices = len(_ALEXNET_SLICES)

  def slice(self, x: jax.Array, s: int) -> jax.Array:
    index, features, kernel, stride, pad, pool = _ALEXNET_SLICES[s]
    if pool:
      x = max_pool(x, 3, 2)
    return nn.relu(_conv(features, kernel, stride, pad, f"features_{index}", self.dtype, self.precision)(x))


# (torchvision index, output channels) of each 3x3 conv, one tuple per LPIPS slice; a 2x2 max pool opens every
# slice but the first.
_VGG16_SLICES = (((0, 64), (2, 64)), ((5, 128), (7, 128)), ((10, 256), (12, 256), (14, 256)),
                 ((17, 512), (19, 512), (21, 512)), ((24, 512), (26, 512), (28, 512)))


class VGG16(_Trunk):
  """torchvision `vgg16().features[:30]` (no batch norm); taps relu1_2..relu5_3 (64, 128, 256, 512, 512)."""

  slices = len(_VGG16_SLICES)

  def slice(self, x: jax.Array, s: int) -> jax.Array:
    if s:
      x = max_pool(x, 2, 2)
    for index, features in _VGG16_SLICES[s]:
      x = nn.relu(_conv(features, 3, 1, 1, f"features_{index}", self.dtype, self.precision)(x))
    return x


# (block, position in the block, torchvision index, output channels) of each of VGG16's 13 convs, in order.
_VGG16_CONVS = tuple((b, p, i, c) for b, block in enumerate(_VGG16_SLICES) for p, (i, c) in enumerate(block))


class VGG16Avg(_Trunk):
  """E-LPIPS's VGG16 (docs/variants.md §2 A.2): torchvision's 13 convolutions (named as `VGG16`'s, so the VGG16
  trunk file serves both), 2x2/2 average pools in place of the max pools (sizes rounded down); 14 taps: the scaled
  input itself, then every conv's ReLU.

  With a "dropout" rng (`apply(..., rngs={"dropout": key})`), the input of every conv is kept with probability
  `KEEP` and scaled by 1 / KEEP, as the reference's ensemble does. The batch is `mask_groups` equal groups that see
  the same masks: 2 for a pair's two images stacked, the batch size for one sample shared by every image.
  """

  mask_groups: int = 1
  slices = 1 + len(_VGG16_CONVS)
  KEEP = 0.99
  LEVELS = (0, *(block for block, _, _, _ in _VGG16_CONVS))  # each tap's number of pools before it

  @nn.compact
  def __call__(self, x: jax.Array, valid=None) -> tuple[jax.Array, ...]:
    """`valid` (n, m): only the top left n x m pixels are the image, the rest padding (E-LPIPS's canvas,
    `elpips.network_input`): every conv input and tap is zero outside the valid part at its level (n and m halved,
    rounded down, at each pool), so the valid part computes as the image alone would with zero padding."""
    masks = self.masks(x.shape) if self.has_rng("dropout") else [None] * len(_VGG16_CONVS)
    x = x if valid is None else x * _region(x.shape, valid, 0).astype(x.dtype)
    run, taps = _remat(type(self).slice, self.remat), [x]
    for s, mask in enumerate(masks, 1):
      taps.append(x := run(self, x, s, mask, valid))
    return tuple(taps)

  def masks(self, shape) -> list[jax.Array]:
    """The dropout masks (0 or 1 / KEEP) of the 13 conv inputs for a batch of `shape`, from one draw: the compile
    time of one random draw per conv was most of the network's."""
    n, h, w, c = shape
    inputs = (c, *(features for _, _, _, features in _VGG16_CONVS[:-1]))
    shapes = [(n // self.mask_groups, h >> b, w >> b, c) for (b, _, _, _), c in zip(_VGG16_CONVS, inputs)]
    keep = jax.random.bernoulli(self.make_rng("dropout"), self.KEEP, (sum(map(math.prod, shapes)),))
    scaled = keep.astype(self.dtype or jnp.float32) / self.KEEP
    ends = np.cumsum([0, *map(math.prod, shapes)])
    return [jnp.tile(scaled[a:b].reshape(s), (self.mask_groups, 1, 1, 1)) for a, b, s in zip(ends, ends[1:], shapes)]

  def slice(self, x: jax.Array, s: int, mask=None, valid=None) -> jax.Array:
    block, position, index, features = _VGG16_CONVS[s - 1]
    if block and not position:  # the 2x2/2 average pool opening blocks 2-5; an odd last row or column is dropped
      n, h, w, c = x.shape
      x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
      if valid is not None:
        x = x * _region(x.shape, valid, block).astype(x.dtype)
    if mask is not None:
      x = x * mask.astype(x.dtype)
    x = nn.relu(_conv(features, 3, 1, 1, f"features_{index}", self.dtype, self.precision)(x))
    return x if valid is None else x * _region(x.shape, valid, block).astype(x.dtype)


def _region(shape, valid, level: int) -> jax.Array:
  """[1, h, w, 1]: 1 on the top left (n // 2**level) x (m // 2**level) pixels of a map of `shape`, 0 elsewhere."""
  rows, cols = (jnp.arange(size) < v // 2**level for size, v in zip(shape[1:3], valid))
  return (rows[:, None] & cols[None, :]).astype(jnp.float32)[None, :, :, None]


BINOMIAL = (0.25, 0.5, 0.25)  # the blur pool's 1-D filter; ST-LPIPS's 2-D filter is its outer product


def blur_pool(x: jax.Array) -> jax.Array:
  """ST-LPIPS's anti-aliased downsampling on NHWC (the reference's `Downsample(filt_size=3, stride=2,
  pad_more=True)`): reflect-pad 2 pixels on every side, then the per-channel 3x3 binomial filter
  [1, 2, 1]^T [1, 2, 1] / 16 at stride 2; out = (size + 1) // 2 + 1. Written as the separable filter over strided
  views (rows, then columns), like `max_pool`; the filter is fixed, not a parameter.
  """
  x = jnp.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)], mode="reflect")  # torch ReflectionPad2d: the edge not repeated
  for axis in (1, 2):
    n = (x.shape[axis] - 3) // 2 + 1
    taps = [jax.lax.slice_in_dim(x, i, i + 2 * (n - 1) + 1, 2, axis) for i in range(3)]
    x = BINOMIAL[0] * taps[0] + BINOMIAL[1] * taps[1] + BINOMIAL[2] * taps[2]
  return x


# (index in the reference's `features`, output channels, kernel, padding, a stride-1 3x3 max pool and a blur pool
# first) of each ST-LPIPS AlexNet slice's conv. Every stride of torchvision's AlexNet becomes stride 1 followed by
# a blur pool: the first conv's stride 4 becomes one blur pool (before its ReLU), each 3x3/2 max pool a 3x3/1 max
# pool and a blur pool.
_ST_ALEXNET_SLICES = ((0, 64, 11, 2, False), (5, 192, 5, 2, True), (9, 384, 3, 1, True), (11, 256, 3, 1, False),
                      (13, 256, 3, 1, False))


class STAlexNet(_Trunk):
  """ST-LPIPS's shift-tolerant AlexNet (`stlpips_pytorch`, variant "shift_tolerant"); taps as AlexNet's."""

  slices = len(_ST_ALEXNET_SLICES)

  def slice(self, x: jax.Array, s: int) -> jax.Array:
    index, features, kernel, pad, pool = _ST_ALEXNET_SLICES[s]
    if pool:
      x = blur_pool(max_pool(x, 3, 1))
    x = _conv(features, kernel, 1, pad, f"features_{index}", self.dtype, self.precision)(x)
    return nn.relu(blur_pool(x) if s == 0 else x)


class STVGG16(_Trunk):
  """ST-LPIPS's shift-tolerant VGG16: each 2x2/2 max pool becomes a 2x2/1 max pool and a blur pool, which moves
  every later layer one index up in the reference's `features` (slice s's convs are VGG16's + s)."""

  slices = len(_VGG16_SLICES)

  def slice(self, x: jax.Array, s: int) -> jax.Array:
    if s:
      x = blur_pool(max_pool(x, 2, 1))
    for index, features in _VGG16_SLICES[s]:
      x = nn.relu(_conv(features, 3, 1, 1, f"features_{index + s}", self.dtype, self.precision)(x))
    return x


class Fire(nn.Module):
  """SqueezeNet's Fire module: a 1x1 squeeze, then 1x1 and 3x3 expands concatenated in that order."""

  squeeze: int
  expand: int
  dtype: Any = None
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(_conv, dtype=self.dtype, precision=self.precision)
    x = nn.relu(conv(self.squeeze, 1, 1, 0, "squeeze")(x))
    return jnp.concatenate([nn.relu(conv(self.expand, 1, 1, 0, "expand1x1")(x)),
                            nn.relu(conv(self.expand, 3, 1, 1, "expand3x3")(x))], axis=-1)


# (torchvision index, squeeze channels, expand channels) of each Fire module, one tuple per LPIPS slice after
# conv1; a ceil-mode max pool opens slices 2, 3 and 4.
_SQUEEZENET_SLICES = (((3, 16, 64), (4, 16, 64)), ((6, 32, 128), (7, 32, 128)), ((9, 48, 192),), ((10, 48, 192),),
                      ((11, 64, 256),), ((12, 64, 256),))


class SqueezeNet(_Trunk):
  """torchvision `squeezenet1_1().features`; taps conv1, fire3, fire5..fire9 (64, 128, 256, 384, 384, 512, 512)."""

  slices = 1 + len(_SQUEEZENET_SLICES)

  def slice(self, x: jax.Array, s: int) -> jax.Array:
    if s == 0:
      return nn.relu(_conv(64, 3, 2, 0, "features_0", self.dtype, self.precision)(x))  # stride 2, no padding
    if s <= 3:
      x = max_pool(x, 3, 2, ceil_mode=True)
    for index, squeeze, expand in _SQUEEZENET_SLICES[s - 1]:
      x = Fire(squeeze, expand, self.dtype, self.precision, name=f"features_{index}")(x)
    return x


class Net(NamedTuple):
  trunk: type[nn.Module]
  channels: tuple[int, ...]  # of each tap, in order
  min_size: int  # smallest input height and width for which the reference computes every tap (torch raises below)
  heads: str | None = None  # the released heads' one version, if one set serves both input scalings (ST-LPIPS)
  weights: str | None = None  # the net whose trunk file this trunk uses, if another's (E-LPIPS: torchvision VGG16)
  ensemble: bool = False  # E-LPIPS: a distance averaged over random transformations (lpips_jax.elpips)


NETS = {
    "alex": Net(AlexNet, (64, 192, 384, 256, 256), 31),
    "vgg": Net(VGG16, (64, 128, 256, 512, 512), 16),
    "squeeze": Net(SqueezeNet, (64, 128, 256, 384, 384, 512, 512), 17),
    "alex_st": Net(STAlexNet, (64, 192, 384, 256, 256), 21, heads="ST0.0"),
    "vgg_st": Net(STVGG16, (64, 128, 256, 512, 512), 18, heads="ST0.0"),
    # E-LPIPS: 14 taps, the input and 13 convs. Its smallest size is that of its largest downscaling (8x): below 58
    # pixels some samples leave block 5 an empty map and the reference returns NaN (docs/variants.md §2 D).
    "vgg_ensemble": Net(VGG16Avg, (3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512), 58,
                        heads="E", weights="vgg", ensemble=True),
}
# Other names the official packages, torchvision or pyiqa use for the same trunks.
ALIASES = {"alexnet": "alex", "vgg16": "vgg", "squeezenet": "squeeze", "squeezenet1_1": "squeeze",
           "stlpips": "alex_st", "stlpips-vgg": "vgg_st", "alex_shift_tolerant": "alex_st",
           "vgg_shift_tolerant": "vgg_st", "elpips": "vgg_ensemble", "elpips_vgg": "vgg_ensemble",
           "e-lpips": "vgg_ensemble"}


def net_name(net: str) -> str:
  """The canonical net name (a key of `NETS`) for `net` or one of its aliases."""
  name = ALIASES.get(net, net)
  if name not in NETS:
    raise InputError(f"unknown net {net!r}; choose one of {sorted(NETS)} (aliases: {sorted(ALIASES)})")
  return name
