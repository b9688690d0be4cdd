"""The LPIPS distance as pure functions over a params pytree (port of `lpips.LPIPS.forward`, lpips==0.1.4).

The params layout is `lpips_jax.layout`'s; which net, version and mode a call computes is read off the params'
structure once per call (`lpips_jax.checks.check_params`), so one jitted function serves them all. Every distance
goes through one pipeline (docs/official.md §1.2): trunk taps -> unit normalisation -> per-layer weighted squared
difference -> spatial mean or upsampling -> sum over layers. `pipeline` is that computation for checked inputs; the
public entry points check at the boundary (`lpips_jax.checks`) and call it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from lpips_jax import checks, elpips
from lpips_jax.backbones import NETS
from lpips_jax.checks import check_batch, check_features, check_images, check_params, check_spatial_size
from lpips_jax.errors import InputError
from lpips_jax.layout import Variant

EPS = 1e-10  # official normalize_tensor: added outside the square root

def distance(params, a: ArrayLike, b: ArrayLike, *, key: jax.Array | None = None, samples: int = 1,
             spatial: bool = False, per_layer: bool = False, normalize: bool = False, dtype=None, precision=None,
             remat: bool = False):
  """LPIPS distance between two batches of images, as the official `lpips.LPIPS(...)(a, b)`.

  Args:
    params: pytree from `lpips_jax.load(net, version, lpips=...)`; it decides the net, version and baseline mode.
    a, b: float images, NHWC [N, H, W, 3], RGB in [-1, 1] (or [0, 1] with `normalize=True`), of equal shape and at
      least the net's minimum size (alex 31, vgg 16, squeeze 17, alex_st 21, vgg_st 18, vgg_ensemble 58 pixels).
    key: E-LPIPS params only (`load("vgg_ensemble")`), and required there: the `jax.random` key its random
      transformations and dropout masks are drawn from. The same key (and batch size) gives the same value; a new
      key per training step gives new samples.
    samples: E-LPIPS only: the number of random transformations averaged (the reference's `n`; 1 for a loss).
    spatial: return the distance map [N, H, W] (each layer's map upsampled bilinearly to the input size, summed)
      instead of its mean (not for E-LPIPS, whose samples see the images rescaled, shifted and flipped).
    per_layer: also return the list of per-layer terms, each shaped like the total.
    normalize: the inputs are in [0, 1] (mapped by 2x - 1 first).
    dtype: the trunk's compute dtype, e.g. `jnp.bfloat16` (scaling, normalisation, heads and output stay float32).
    precision: XLA convolution precision, e.g. 'highest' for float32 parity on GPU/TPU.
    remat: recompute each trunk slice and each layer's map in the backward pass instead of storing them (saves
      what the gradient keeps; the peak memory gain depends on XLA's scheduler, see the README).

  Returns:
    float32 [N] (spatial: [N, H, W]); with `per_layer`, the pair `(total, [term_0, ..., term_{L-1}])`.

  Example:
    >>> params = lpips_jax.load("alex")
    >>> a = jnp.zeros((2, 64, 64, 3)); b = jnp.full((2, 64, 64, 3), 0.5)
    >>> lpips_jax.distance(params, a, b).shape
    (2,)

  Works under `jax.jit`, `jax.grad` (all derivatives are finite), `jax.vmap` and sharded inputs. Bad params or
  images raise an InputError (a ValueError) naming the problem and the fix (`lpips_jax.checks`); an empty batch
  (N = 0) gives an empty result. Concrete arrays are also checked for values outside the range and for NaN or
  inf; traced ones (under jit, grad, vmap) cannot be: a NaN pixel or weight there gives a NaN distance (and NaN
  gradients) for its pair without an error.
  """
  v, traced = checks.checked_params(params)
  options = dict(variant=v, per_layer=per_layer, normalize=normalize, dtype=dtype, precision=precision, remat=remat,
                 **variant_options(v, key, samples, spatial))
  if traced or isinstance(key, jax.core.Tracer) or not checks.values_known(a, b):  # transformed: no fused check
    check_images(a, b, v.net, normalize=normalize)  # values only if concrete
    return distance_of_checked(params, a, b, **options)
  # Concrete images: their value check is computed in the distance's own call and read back once, after it (an
  # error is raised before the result is returned); a separate reduction and read before it cost ~8% of an AlexNet
  # call at batch 8 on CPU (bench/eager.py).
  checks.check_image_pair(a, b, v.net)
  # One eager program for the mean with and without `per_layer`: its terms are [N] each, one stacked output, so
  # toggling the option compiles nothing new (a map per layer, with `spatial`, would be a cost; not there).
  merged = not spatial and not NETS[v.net].ensemble
  out, stats = _pipeline_checking(params, a, b, **{**options, "per_layer": merged or per_layer}, stack_terms=merged)
  checks.check_image_values({"a": a, "b": b}, checks.read_back(stats), normalize)
  if merged:
    total, terms = out
    return (total, list(terms)) if per_layer else total
  return out


def features(params, x: ArrayLike, *, key: jax.Array | None = None, normalize: bool = False, dtype=None,
             precision=None, remat: bool = False) -> tuple[jax.Array, ...]:
  """The unit-normalised trunk taps of images `x` [N, H, W, 3]: a tuple of float32 [N, h_l, w_l, C_l].

  E-LPIPS params take a concrete `key` (required; not traced: the sampled downscaling decides the shapes): the taps
  of `x` under the transformation and dropout masks of the first sample `distance(..., key=key)` draws for a batch
  of len(x) pairs. The features of two batches of the same size and key form that sample's pairs, so
  `distance_from_features` of them is `distance(params, a, b, key=key, samples=1)`.

  `dtype` (e.g. `jnp.bfloat16`) is the trunk's compute dtype; scaling, normalisation and the result stay float32.
  `precision` is the XLA convolution precision ('highest' for parity on GPU/TPU, where the default f32 convolution
  is TF32 or a bf16 pass). `remat` recomputes each trunk slice in the backward pass instead of storing its inner
  activations. Float64 inputs (with `jax_enable_x64`) and float64 params are computed in float64 throughout.
  `x` is checked as an input of `distance` (layout, size, dtype; values when concrete: under jit a NaN pixel
  gives NaN features).
  """
  v = check_params(params)
  check_batch(x, v.net, name="x", normalize=normalize)
  if NETS[v.net].ensemble:
    checks.check_sampling(v.net, key, 1, concrete=True)
    taps = elpips.sample_taps(v, params, x, key, normalize=normalize, dtype=dtype, precision=precision, remat=remat)
    return tuple(map(unit_normalize, taps))
  checks.check_sampling(v.net, key, 1)
  return normalized_taps(params, x, variant=v, normalize=normalize, dtype=dtype, precision=precision, remat=remat)


def distance_from_features(params, f0, f1, *, spatial_size: tuple[int, int] | None = None, per_layer: bool = False,
                           dropout_rng: jax.Array | None = None):
  """The distance between two tuples of `features` (e.g. of a fixed target computed once), as `distance`.

  `f0`, `f1`: tuples of one tap per layer of the params' net, as `features(params, ...)` returns, each float
  [N, h_l, w_l, C_l], with equal shapes in `f0` and `f1` (`check_features`; concrete taps must be finite, traced
  NaN taps give NaN distances). `spatial_size` (H, W) returns the spatial map [N, H, W] instead of the mean [N].
  `dropout_rng` applies the training-time Dropout(p=0.5) of the official heads to the squared differences (for
  training the metric only).
  """
  v = check_params(params)
  check_features(f0, f1, v.net)
  spatial_size = check_spatial_size(spatial_size)
  if NETS[v.net].ensemble and spatial_size is not None:
    raise InputError(checks.NOT_SPATIAL)
  return _compare_features(v, params, f0, f1, raw=False, spatial_size=spatial_size, per_layer=per_layer,
                           dropout_rng=dropout_rng)


@functools.partial(jax.jit, static_argnames=("variant", "spatial", "per_layer", "normalize", "dtype", "precision",
                                             "remat"))
def pipeline(params, a, b, *, variant: Variant, spatial: bool, per_layer: bool, normalize: bool, dtype=None,
              precision=None, remat: bool = False):
  """`distance` of checked params (their `variant`, parsed once by the caller) and checked images."""
  # Two trunk calls, as the official: of the same shapes, they compile alike, so d(x, x) is exactly 0 and d(a, b)
  # equals d(b, a) bitwise. One call over the 2N stacked images would guarantee that, but costs 2-4% forward and
  # 32-49% with the gradient w.r.t. `a` alone (bench/eager.py: the gradient then runs through b's trunk too).
  t0, t1 = (trunk_taps(variant, params, x, normalize, dtype, precision, remat) for x in (a, b))
  return compare(variant, params, t0, t1, raw=True, spatial_size=a.shape[1:3] if spatial else None,
                  per_layer=per_layer, remat=remat)


@functools.partial(jax.jit, static_argnames=("variant", "normalize", "dtype", "precision", "remat"))
def normalized_taps(params, x, *, variant: Variant, normalize: bool, dtype=None, precision=None, remat: bool = False):
  """`features` of checked params and images (one compiled program: called eagerly, the trunk's operations would
  each be dispatched, and compiled for each new shape, one by one)."""
  return tuple(map(unit_normalize, trunk_taps(variant, params, x, normalize, dtype, precision, remat)))


def variant_options(v: Variant, key, samples, spatial: bool) -> dict:
  """The options of `distance_of_checked` that depend on the variant: E-LPIPS's key and samples (checked), or the
  other nets' `spatial`."""
  if NETS[v.net].ensemble:
    return dict(key=checks.check_sampling(v.net, key, samples, spatial=spatial), samples=int(samples))
  checks.check_sampling(v.net, key, samples)
  return dict(spatial=spatial)


def distance_of_checked(params, a, b, *, key=None, **options):
  """`distance` of checked params and images: `pipeline`, or E-LPIPS's (`elpips.pipeline`) for its params
  (`options`: `variant_options` and the rest)."""
  if NETS[options["variant"].net].ensemble:
    return elpips.pipeline(params, a, b, key, **options)
  return pipeline(params, a, b, **options)


@functools.partial(jax.jit, static_argnames=("variant", "spatial", "per_layer", "normalize", "dtype", "precision",
                                             "remat", "samples", "stack_terms"))
def _pipeline_checking(params, a, b, *, stack_terms: bool = False, **options):
  """`distance_of_checked` and the `value_stats` of both images, in one computation; `stack_terms`: the per-layer
  terms as one array [L, ...] (one output buffer instead of L)."""
  out = distance_of_checked(params, a, b, **options)
  if stack_terms:
    out = out[0], jnp.stack(out[1])
  return out, [checks.value_stats(a), checks.value_stats(b)]


def trunk_taps(v: Variant, params, x, normalize, dtype, precision, remat, dropout=None, *,
               mask_groups: int = 1, valid=None) -> tuple[jax.Array, ...]:
  """The raw trunk taps, float32 (or float64), before the channel normalisation. E-LPIPS's (`backbones.VGG16Avg`):
  `dropout`, the key of the trunk's dropout masks, the same for each of the batch's `mask_groups` equal groups;
  `valid`, the size of the image on its canvas."""
  return _trunk(v.net, dtype, precision, remat, None if dropout is None else mask_groups, params[v.net],
                _scale_input(v, params, x, normalize), valid, dropout)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _trunk(net: str, dtype, precision, remat: bool, mask_groups: int | None, trunk_params, x, valid, dropout):
  """`trunk_taps` after the input scaling. Its own jit, for tracing only: the two images of a distance, and every
  program of the same trunk and image shape in a process, reuse one trace of the Flax modules (~0.1 s each for
  SqueezeNet, most of a program's tracing) and one lowered function. XLA inlines the calls before optimising, so
  the compiled computation is the same."""
  trunk = NETS[net].trunk(dtype=dtype, precision=precision, remat=remat,
                          **({} if mask_groups is None else {"mask_groups": mask_groups}))
  taps = trunk.apply({"params": trunk_params}, x, *(() if valid is None else (valid,)),
                     rngs=None if dropout is None else {"dropout": dropout})
  return tuple(t.astype(_float32_or_wider(t.dtype)) for t in taps)


def compare(v: Variant, params, u0, u1, *, raw: bool, spatial_size=None, per_layer=False, dropout_rng=None,
            remat=False, areas=None):
  """The distance from two tuples of taps: `raw` trunk taps (unit-normalised here) or already unit-normalised.
  `areas`: each tap's valid area, where the taps are on a larger canvas (E-LPIPS) that is equal in both, so adds 0."""
  def term(k, x0, x1):  # layer k's term: normalise both taps, map, reduce
    if raw:
      x0, x1 = unit_normalize(x0), unit_normalize(x1)
    m = _layer_map(v, params, k, x0, x1, dropout_rng)
    if areas is not None:
      return jnp.sum(m, axis=(1, 2)) / areas[k].astype(m.dtype)
    return jnp.mean(m, axis=(1, 2)) if spatial_size is None else _upsample(m, spatial_size)

  if remat:  # keep only the raw taps for the backward pass: the normalised taps and squared differences are as large
    term = jax.checkpoint(term, static_argnums=0)
  terms = [term(k, x0, x1) for k, (x0, x1) in enumerate(zip(u0, u1))]
  out = terms[0]
  for t in terms[1:]:  # a running sum in layer order, as the official
    out = out + t
  return (out, terms) if per_layer else out


# `distance_from_features`'s computation, one program (eagerly, each operation would be dispatched on its own).
_compare_features = jax.jit(compare, static_argnums=0, static_argnames=("raw", "spatial_size", "per_layer", "remat"))


def unit_normalize(f: jax.Array) -> jax.Array:
  """Unit-normalise each feature vector over channels (the last axis): `f / (||f||_2 + 1e-10)`.

  The forward value is the official `normalize_tensor`'s, bit for bit. Its derivative is finite everywhere:
  the official `sqrt` has an infinite derivative at an all-zero vector (common after ReLU) and the chain rule turns
  it into NaN (lpips#69, #121; NaN in forward mode). Here the square root only ever sees positive inputs, so every
  derivative of every order exists; at a zero vector the norm's derivative is taken as 0, and `d f / (||f|| + eps)`
  is the exact derivative of the whole expression there.
  """
  sq = jnp.sum(f * f, axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return f / (norm + EPS)


def _layer_map(v: Variant, params, k: int, n0: jax.Array, n1: jax.Array, dropout_rng) -> jax.Array:
  """Layer k's distance map [N, h, w]: `sum_c w_c (n0 - n1)^2` with the heads' weights w (the code's w, the paper's
  w^2: lpips#72), or the plain channel sum for the baseline; `dropout_rng`: the heads' training Dropout(p=0.5)."""
  # |n0 - n1| as max - min: XLA turns each normalisation into a product, and a product followed by a subtraction
  # compiles to a fused multiply-add, which rounds one side only; d(x, x) would be ~1e-16, and d(a, b) and d(b, a)
  # would differ in the last bits. Neither operand of this subtraction is a product, and it is symmetric.
  d = (jnp.maximum(n0, n1) - jnp.minimum(n0, n1)) ** 2
  if not v.lpips:
    return jnp.sum(d, axis=-1)
  if dropout_rng is not None:
    # Drawn flat and reshaped: the same bits as drawing d.shape, but XLA compiles a 4-D draw several times slower.
    keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, k), 0.5, (d.size,)).reshape(d.shape)
    d = jnp.where(keep, d * 2, 0)
  # The head's 1x1 convolution as a weighted sum over channels: a reduction, in float32 on every backend (no TF32 or
  # bf16 passes to ask away), and quick to compile; XLA's CPU compiler spent ~30 ms on each small dot, half of an
  # AlexNet forward program's compile time. The sum runs in another order than a convolution's (last-bit changes).
  return jnp.sum(d * params[f"lin{k}"]["kernel"].reshape(1, 1, 1, -1), axis=-1)


def _upsample(m: jax.Array, size: tuple[int, int]) -> jax.Array:
  """A layer map [N, h, w] upsampled bilinearly to [N, H, W]: `jax.image.resize` 'linear' samples at half-pixel
  centres and renormalises at the borders, which for upsampling is torch's `nn.Upsample(size=..., mode='bilinear',
  align_corners=False)`."""
  return jax.image.resize(m, (m.shape[0], *size), "linear")


def _scale_input(v: Variant, params, x: ArrayLike, normalize: bool) -> jax.Array:
  """Map images to what the trunk expects: [0,1] -> [-1,1] if `normalize`, then the v0.1 ScalingLayer if present."""
  x = to_float(x)
  if normalize:
    x = 2 * x - 1
  if v.scaled:
    shift, scale = (params["scaling"][k].reshape(1, 1, 1, 3) for k in ("shift", "scale"))
    x = (x - shift) / scale  # subtract, then divide, as the official
  return x


def to_float(x: ArrayLike) -> jax.Array:
  """`x` as float32, or float64 if it is float64: the metric never computes below float32."""
  x = jnp.asarray(x)
  return x.astype(_float32_or_wider(x.dtype))


def _float32_or_wider(dtype) -> type:
  """float32, or float64 for float64 arrays (with jax_enable_x64): the metric never computes below float32."""
  return jnp.float64 if dtype == jnp.float64 else jnp.float32
