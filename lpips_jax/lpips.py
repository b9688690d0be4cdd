"""The LPIPS distance as pure functions over a params pytree (port of `lpips.LPIPS.forward`, lpips==0.1.4).

A params pytree is a dict with
  - the trunk, under its net name: `"alex"`, `"vgg"` or `"squeeze"` (linen params of `backbones.NETS[net].trunk`);
  - `"scaling": {"shift": f32[3], "scale": f32[3]}` for version 0.1 only (the official `ScalingLayer` buffers);
  - `"lin0"` ... `"lin{L-1}": {"kernel": f32[1, 1, C_l, 1]}`, the linear heads, absent for the uncalibrated
    baseline (the official `lpips=False`).
Which net, version and mode a call computes is read off this structure once per call (`check_params`), so one
jitted function serves them all. Every distance goes through one pipeline (docs/official.md §1.2): trunk taps ->
unit normalisation -> per-layer weighted squared difference -> spatial mean or upsampling -> sum over layers
(`_compare`).

Every public entry point checks its inputs at one boundary before computing (`check_params`, `check_images`,
`check_features`): structure, shapes and dtypes always; values (range, NaN, inf) only for concrete arrays, since
under `jax.jit`, `grad` or `vmap` they are unknown. Each error is one line naming the argument, the problem and the
fix.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from lpips_jax.backbones import NETS

# Official ScalingLayer: ImageNet mean/std re-expressed for inputs in [-1, 1] (shift = 2 mean - 1, scale = 2 std).
SHIFT = np.array([-.030, -.088, -.188], np.float32)
SCALE = np.array([.458, .448, .450], np.float32)
EPS = 1e-10  # official normalize_tensor: added outside the square root
# The official weight versions and whether each scales the input: 0.1 does; 0.0, the original release, does not.
VERSIONS = {"0.0": False, "0.1": True}


def distance(params, a: ArrayLike, b: ArrayLike, *, spatial: bool = False, per_layer: bool = False,
             normalize: bool = False, dtype=None, precision=None, remat: bool = False):
  """LPIPS distance between two batches of images, as the official `lpips.LPIPS(...)(a, b)`.

  Args:
    params: pytree from `lpips_jax.load(net, version, lpips=...)`; it decides the net, version and baseline mode.
    a, b: float images, NHWC [N, H, W, 3], RGB in [-1, 1] (or [0, 1] with `normalize=True`), of equal shape and at
      least the net's minimum size (alex 31, vgg 16, squeeze 17 pixels).
    spatial: return the distance map [N, H, W] (each layer's map upsampled bilinearly to the input size, summed)
      instead of its mean.
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
  images raise a ValueError naming the problem and the fix (`check_params`, `check_images`); an empty batch
  (N = 0) gives an empty result. Concrete arrays are also checked for values outside the range and for NaN or
  inf; traced ones (under jit, grad, vmap) cannot be: a NaN pixel or weight there gives a NaN distance (and NaN
  gradients) for its pair without an error.
  """
  v = check_params(params)
  check_images(a, b, v.net, normalize=normalize)
  return _distance(params, a, b, variant=v, spatial=spatial, per_layer=per_layer, normalize=normalize, dtype=dtype,
                   precision=precision, remat=remat)


def features(params, x: ArrayLike, *, normalize: bool = False, dtype=None, precision=None,
             remat: bool = False) -> tuple[jax.Array, ...]:
  """The unit-normalised trunk taps of images `x` [N, H, W, 3]: a tuple of float32 [N, h_l, w_l, C_l].

  `dtype` (e.g. `jnp.bfloat16`) is the trunk's compute dtype; scaling, normalisation and the result stay float32.
  `precision` is the XLA convolution precision ('highest' for parity on GPU/TPU, where the default f32 convolution
  is TF32 or a bf16 pass). `remat` recomputes each trunk slice in the backward pass instead of storing its inner
  activations. Float64 inputs (with `jax_enable_x64`) and float64 params are computed in float64 throughout.
  `x` is checked as an input of `distance` (layout, size, dtype; values when concrete: under jit a NaN pixel
  gives NaN features).
  """
  v = check_params(params)
  check_batch(x, v.net, name="x", normalize=normalize)
  return tuple(map(normalize_channels, _taps(v, params, x, normalize, dtype, precision, remat)))


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
  if spatial_size is not None and not (isinstance(spatial_size, (tuple, list)) and len(spatial_size) == 2 and
                                       all(_is_positive_int(n) for n in spatial_size)):
    raise ValueError(f"spatial_size must be (H, W), two positive integers (the images' size); got {spatial_size!r}")
  return _compare(v, params, f0, f1, normalized=True, spatial_size=spatial_size, per_layer=per_layer,
                  dropout_rng=dropout_rng)


class Variant(NamedTuple):
  net: str
  scaled: bool  # version 0.1
  lpips: bool  # linear heads (False: the uncalibrated baseline, an unweighted channel sum)


# -- the boundary: the checks every public entry point runs before computing ------------------------------------------

# What to do about params whose arrays are not usable weights.
PARAMS_FIX = "pass the float32 params of lpips_jax.load(net, version), or lpips_jax.load(path) for a weights file"


def variant(params) -> Variant:
  """Which net, version and mode `params` describes; raises if it is not a params dict or its keys fit none."""
  problem = _not_params(params)
  if problem:
    raise ValueError(problem)
  keys = set(params)
  nets = sorted(keys & NETS.keys())
  if len(nets) != 1:
    raise ValueError(f"params must hold exactly one trunk, under one of {sorted(NETS)}; got top-level keys "
                     f"{sorted(keys)}. Get params with lpips_jax.load(net, version).")
  net = nets[0]
  heads = {f"lin{k}" for k in range(len(NETS[net].channels))}
  lpips = bool(keys & heads)
  expected = {net} | ({"scaling"} & keys) | (heads if lpips else set())
  if keys != expected:
    raise ValueError(f"params for net {net!r}: missing keys {sorted(expected - keys)}, unexpected keys "
                     f"{sorted(keys - expected)}; expected {sorted(expected)}.")
  return Variant(net, "scaling" in keys, lpips)


def check_params(params) -> Variant:
  """The variant of `params`, after checking its structure, every array's shape, that every array is real floating
  point, and, for concrete arrays, that every value is finite. Traced params (under jit or grad) are checked for
  structure, shape and dtype only: a NaN weight there gives NaN distances."""
  v = check_structure(params)
  check_arrays(params, prefix="params ", fix=PARAMS_FIX)
  return v


def check_structure(params) -> Variant:
  """The variant of `params`, after checking its structure and every array's shape (not the values: `load` has
  checked a file's values already)."""
  v = variant(params)
  version = next(name for name, scaled in VERSIONS.items() if scaled == v.scaled)
  expected = param_shapes(v.net, version, v.lpips)
  got = jax.tree_util.tree_flatten_with_path(params)[0]
  want = dict(jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda s: isinstance(s, tuple))[0])
  problems = [f"{_key(p)}: missing" for p in want if p not in dict(got)]
  problems += [f"{_key(p)}: unexpected" if p not in want else f"{_key(p)}: shape {jnp.shape(x)}, expected "
               f"{want[p]}" for p, x in got if p not in want or tuple(jnp.shape(x)) != want[p]]
  if problems:
    raise ValueError(f"params do not fit net {v.net!r}: " + "; ".join(problems))
  return v


def check_arrays(tree, *, prefix: str, fix: str) -> None:
  """Raise a ValueError naming the key (after `prefix`) and ending in `fix` unless every array of `tree` is real
  floating point (not integer, bool or complex: those give wrong or complex distances) and, where concrete,
  finite. The one check of weights, for params and for weight files alike."""
  leaves = [(_key(path), x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  for key, x in leaves:
    dtype = _dtype(x)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{prefix}{key} has dtype {dtype}; LPIPS weights are real floating-point arrays: {fix}")
  concrete = [(key, x) for key, x in leaves if not isinstance(x, jax.core.Tracer) and np.size(x)]
  for (key, x), (low, high) in zip(concrete, _extrema([x for _, x in concrete])):
    if not (np.isfinite(low) and np.isfinite(high)):
      raise ValueError(f"{prefix}{key} has {_nonfinite(x)}: the weights are damaged (a diverged training run or "
                       f"a bad conversion); {fix}")


def check_images(a, b, net: str, *, normalize: bool = False, names: tuple[str, str] = ("a", "b")) -> None:
  """Raise a ValueError naming the problem and the fix unless `a`, `b` are valid LPIPS inputs for `net`: each
  `check_batch`, and of the same shape. `names` are the arguments' names in the messages."""
  for name, x in zip(names, (a, b)):
    _check_layout(name, x, net)
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(f"{names[0]} and {names[1]} must have the same shape; got {jnp.shape(a)} and {jnp.shape(b)} "
                     f"(resize one first)")
  for name, x in zip(names, (a, b)):
    _check_values(name, x, normalize)


def check_batch(x, net: str, *, name: str = "x", normalize: bool = False) -> None:
  """Raise a ValueError naming `name`, the problem and the fix unless `x` is a batch of LPIPS inputs for `net`:
  NHWC [N, H, W, 3] (N may be 0), H and W at least the net's minimum, floating point, and, if concrete, finite and
  in [-1, 1] ([0, 1] with `normalize`). Traced values (under jit, grad, vmap) are unknown and not checked."""
  _check_layout(name, x, net)
  _check_values(name, x, normalize)


def check_features(f0, f1, net: str) -> None:
  """Raise a ValueError naming the tap and the fix unless `f0`, `f1` are `features` of params of `net`: one tap
  per layer, each floating point, [N, h_l, w_l, C_l] with the net's channels C_l, the same N in every tap, equal
  shapes in `f0` and `f1`, and, if concrete, finite."""
  channels = NETS[net].channels
  for name, f in (("f0", f0), ("f1", f1)):
    if not isinstance(f, (tuple, list)):
      raise ValueError(f"{name} is of type {type(f).__name__}; expected the tuple of taps that "
                       f"lpips_jax.features(params, x) returns")
    got = [tuple(jnp.shape(t)) for t in f]
    if len(got) != len(channels) or any(len(s) != 4 or s[-1] != c for s, c in zip(got, channels)):
      other = [n for n, spec in NETS.items() if n != net and [s[-1:] for s in got] == [(c,) for c in spec.channels]]
      hint = f" (these are features of net {other[0]!r})" if other else ""
      raise ValueError(f"{name} has taps of shapes {got}; params of net {net!r} need {len(channels)} taps "
                       f"[N, h, w, C] with C = {list(channels)}{hint}: compute them with lpips_jax.features and "
                       f"the same params")
    for k, t in enumerate(f):
      if not jnp.issubdtype(_dtype(t), jnp.floating):
        raise ValueError(f"{name}[{k}] has dtype {_dtype(t)}; features are floating point, as "
                         f"lpips_jax.features returns them")
    if len({jnp.shape(t)[0] for t in f}) > 1:
      raise ValueError(f"{name}'s taps hold different batch sizes {[jnp.shape(t)[0] for t in f]}; pass the tuple "
                       f"of one lpips_jax.features call")
  for k, (t0, t1) in enumerate(zip(f0, f1)):
    if jnp.shape(t0) != jnp.shape(t1):
      raise ValueError(f"f0[{k}] and f1[{k}] have shapes {jnp.shape(t0)} and {jnp.shape(t1)}; features of images "
                       f"of the same shape are needed")
  concrete = [(f"{name}[{k}]", t) for name, f in (("f0", f0), ("f1", f1)) for k, t in enumerate(f)
              if not isinstance(t, jax.core.Tracer) and np.size(t)]
  for (name, t), (low, high) in zip(concrete, _extrema([t for _, t in concrete])):
    if not (np.isfinite(low) and np.isfinite(high)):
      raise ValueError(f"{name} has {_nonfinite(t)}: features of finite images are finite; check the images or "
                       f"params they came from")


@functools.cache
def param_shapes(net: str, version: str = "0.1", lpips: bool = True) -> dict:
  """The pytree of parameter shapes for a variant: the reference every weight file and params is checked against."""
  spec = NETS[net]
  trunk = jax.eval_shape(spec.trunk().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  shapes = {net: jax.tree.map(lambda s: s.shape, trunk["params"])}
  if VERSIONS[version]:
    shapes["scaling"] = {"shift": (3,), "scale": (3,)}
  if lpips:
    shapes.update({f"lin{k}": {"kernel": (1, 1, c, 1)} for k, c in enumerate(spec.channels)})
  return shapes


def scaling(version: str) -> dict:
  """The params entries of the input scaling: `{"scaling": {"shift", "scale"}}` for version 0.1, `{}` for 0.0."""
  if version not in VERSIONS:
    raise ValueError(f"unknown version {version!r}; choose the string '0.1' (default) or '0.0'")
  return {"scaling": {"shift": SHIFT.copy(), "scale": SCALE.copy()}} if VERSIONS[version] else {}


def check_positive_int(value, name: str) -> int:
  """`value` as an int, or a ValueError naming `name` unless it is a positive integer (not a bool or a float)."""
  if not _is_positive_int(value):
    raise ValueError(f"{name} must be a positive integer; got {value!r}")
  return int(value)


def _is_positive_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 1


def _not_params(params) -> str | None:
  """Why `params` is not a params dict, with what to pass instead, when it is something else: None, not a dict, an
  NNX state or NNX variables, or linen variables holding the LPIPS weights further down."""
  if params is None:
    return f"params is None; {PARAMS_FIX}"
  is_variable = lambda x: isinstance(x, nnx.Variable)
  if isinstance(params, nnx.State):
    inner = _path_to_params(nnx.to_pure_dict(params))
    return (f"params is an nnx.State (e.g. nnx.state(model)), whose leaves are NNX variables; pass plain arrays: "
            f"nnx.to_pure_dict(state){inner}" if inner is not None else
            f"params is an nnx.State holding no LPIPS weights; {PARAMS_FIX}")
  if not isinstance(params, Mapping):
    return f"params is a {type(params).__name__}, not a dict of arrays; {PARAMS_FIX}"
  if any(map(is_variable, jax.tree.leaves(params, is_leaf=is_variable))):
    return ("params hold NNX variables, not arrays; pass plain arrays: nnx.to_pure_dict(nnx.State(params)), or "
            "call the NNXLPIPS module itself")
  if not set(params) & NETS.keys():
    inner = _path_to_params(params)
    if inner:
      return (f"params look like a linen variables dict (top-level keys {sorted(map(str, params))}); pass the "
              f"LPIPS weights inside it: variables{inner}")
  return None


def _path_to_params(tree, depth: int = 5) -> str | None:
  """The subscripts (e.g. "['lpips']['LPIPS_0']['weights']") of the first dict under `tree` holding a trunk."""
  if not isinstance(tree, Mapping) or depth < 0:
    return None
  if set(tree) & NETS.keys():
    return ""
  for key, value in tree.items():
    inner = _path_to_params(value, depth - 1)
    if inner is not None:
      return f"[{key!r}]{inner}"
  return None


def _check_layout(name: str, x, net: str) -> None:
  """What `check_batch` checks without looking at values: rank, layout, channels, dtype, size."""
  shape, dtype = jnp.shape(x), _dtype(x)
  if len(shape) != 4:
    hint = " (a single image? add a batch axis: x[None])" if len(shape) == 3 else ""
    raise ValueError(f"{name} has shape {shape}; expected a batch of NHWC images [N, H, W, 3]{hint}")
  if shape[-1] != 3:
    if shape[1] == 3:
      raise ValueError(f"{name} has shape {shape}, which looks channels-first (NCHW); lpips_jax expects NHWC "
                       f"[N, H, W, 3]: pass x.transpose(0, 2, 3, 1)")
    hint = " (grayscale? repeat it: jnp.repeat(x, 3, axis=-1))" if shape[-1] == 1 else ""
    raise ValueError(f"{name} has {shape[-1]} channels (shape {shape}); LPIPS takes RGB images [N, H, W, 3]{hint}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} has dtype {dtype}; expected floating-point images in [-1, 1] (or [0, 1] with "
                     f"normalize=True); for 8-bit images use x.astype(np.float32) / 127.5 - 1")
  h, w = shape[1:3]
  least = NETS[net].min_size
  if h < least or w < least:
    raise ValueError(f"{name}: images of {h}x{w} are too small for net {net!r}: it needs at least {least}x{least} "
                     f"(LPIPS was trained on 64x64 patches; upsample small images)")


def _check_values(name: str, x, normalize: bool) -> None:
  """Concrete images only: finite, and within the value range (with 1e-3 of slack for rounding)."""
  if isinstance(x, jax.core.Tracer) or not np.size(x):
    return  # values are unknown under jit/grad/vmap
  (x_min, x_max), = _extrema([x])
  if not (np.isfinite(x_min) and np.isfinite(x_max)):
    raise ValueError(f"{name} has {_nonfinite(x)}; LPIPS is undefined there: find where they come from, or "
                     f"replace them (jnp.nan_to_num)")
  lo, hi = (0.0, 1.0) if normalize else (-1.0, 1.0)
  if not (x_min >= lo - 1e-3 and x_max <= hi + 1e-3):
    fix = ("use normalize=True for [0, 1] images, x / 127.5 - 1 for 8-bit values, or clip" if not normalize
           else "pass [-1, 1] images without normalize=True, or clip")
    raise ValueError(f"{name} has values in [{x_min:.4g}, {x_max:.4g}], outside the expected [{lo:g}, {hi:g}]: "
                     f"{fix}")


def _extrema(arrays: list) -> list[tuple[float, float]]:
  """(min, max) of each concrete, non-empty array, NaN where it holds a NaN. Numpy arrays are reduced on the host,
  jax arrays where they live, all in one jitted call (no copy to the host), also while something else is traced."""
  out = [(0.0, 0.0)] * len(arrays)
  on_device = [i for i, x in enumerate(arrays) if isinstance(x, jax.Array)]
  for i, x in enumerate(arrays):
    if i not in on_device:
      x = np.asarray(x)
      out[i] = (float(x.min()), float(x.max()))
  if on_device:
    with jax.ensure_compile_time_eval():
      found = jax.device_get(_device_extrema([arrays[i] for i in on_device]))
    for i, (low, high) in zip(on_device, found):
      out[i] = (float(low), float(high))
  return out


@jax.jit
def _device_extrema(arrays: list) -> list:
  return [(jnp.min(x), jnp.max(x)) for x in arrays]


def _nonfinite(x) -> str:
  """'3 NaN values (of 12288)', '1 infinite value (of 9)' or both, for a concrete array that has some."""
  values = np.asarray(x)
  counts = [(int(np.isnan(values).sum()), "NaN"), (int(np.isinf(values).sum()), "infinite")]
  words = " and ".join(f"{n} {kind}" for n, kind in counts if n)
  return f"{words} value{'s' if sum(n for n, _ in counts) > 1 else ''} (of {values.size})"


def _dtype(x) -> np.dtype:
  return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _key(path) -> str:
  """'alex/features_0/kernel' for a pytree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


# -- the pipeline --------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("variant", "spatial", "per_layer", "normalize", "dtype", "precision",
                                             "remat"))
def _distance(params, a, b, *, variant: Variant, spatial: bool, per_layer: bool, normalize: bool, dtype=None,
              precision=None, remat: bool = False):
  # Two trunk calls, as the official. XLA may compile them differently, so d(a, b) and d(b, a), or d(x, x) and 0,
  # can differ in the last bits (~1e-16); running both through one `lax.map` loop would make them bitwise equal but
  # makes the backward pass several times slower on CPU (vgg 64x64: 7.7 s against 2.1 s per gradient step).
  t0, t1 = (_taps(variant, params, x, normalize, dtype, precision, remat) for x in (a, b))
  return _compare(variant, params, t0, t1, normalized=False, spatial_size=a.shape[1:3] if spatial else None,
                  per_layer=per_layer, remat=remat)


def _taps(v: Variant, params, x, normalize, dtype, precision, remat) -> tuple[jax.Array, ...]:
  """The raw trunk taps, float32 (or float64), before the channel normalisation."""
  apply = NETS[v.net].trunk(dtype=dtype, precision=precision, remat=remat).apply
  taps = apply({"params": params[v.net]}, _scale_input(v, params, x, normalize))
  return tuple(t.astype(_float32_or_wider(t.dtype)) for t in taps)


def _compare(v: Variant, params, u0, u1, *, normalized: bool, spatial_size=None, per_layer=False, dropout_rng=None,
             remat=False):
  """The distance from two tuples of taps: raw (`normalized=False`) or already unit-normalised."""
  def term(k, x0, x1):  # layer k's term: normalise both taps, map, reduce
    if not normalized:
      x0, x1 = normalize_channels(x0), normalize_channels(x1)
    m = _layer_map(v, params, k, x0, x1, dropout_rng)
    return jnp.mean(m, axis=(1, 2)) if spatial_size is None else _upsample(m, spatial_size)

  if remat:  # keep only the raw taps for the backward pass: the normalised taps and squared differences are as large
    term = jax.checkpoint(term, static_argnums=0)
  terms = [term(k, x0, x1) for k, (x0, x1) in enumerate(zip(u0, u1))]
  out = terms[0]
  for t in terms[1:]:  # a running sum in layer order, as the official
    out = out + t
  return (out, terms) if per_layer else out


def normalize_channels(f: jax.Array) -> jax.Array:
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
  d = (n0 - n1) ** 2
  if not v.lpips:
    return jnp.sum(d, axis=-1)
  if dropout_rng is not None:
    # Drawn flat and reshaped: the same bits as drawing d.shape, but XLA compiles a 4-D draw several times slower.
    keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, k), 0.5, (d.size,)).reshape(d.shape)
    d = jnp.where(keep, d * 2, 0)
  return jnp.dot(d, params[f"lin{k}"]["kernel"][0, 0, :, 0], precision=jax.lax.Precision.HIGHEST)


def _upsample(m: jax.Array, size: tuple[int, int]) -> jax.Array:
  """A layer map [N, h, w] upsampled bilinearly to [N, H, W]: `jax.image.resize` 'linear' samples at half-pixel
  centres and renormalises at the borders, which for upsampling is torch's `nn.Upsample(size=..., mode='bilinear',
  align_corners=False)`."""
  return jax.image.resize(m, (m.shape[0], *size), "linear")


def _scale_input(v: Variant, params, x: ArrayLike, normalize: bool) -> jax.Array:
  """Map images to what the trunk expects: [0,1] -> [-1,1] if `normalize`, then the v0.1 ScalingLayer if present."""
  x = jnp.asarray(x)
  x = x.astype(_float32_or_wider(x.dtype))
  if normalize:
    x = 2 * x - 1
  if v.scaled:
    shift, scale = (params["scaling"][k].reshape(1, 1, 1, 3) for k in ("shift", "scale"))
    x = (x - shift) / scale  # subtract, then divide, as the official
  return x


def _float32_or_wider(dtype) -> type:
  """float32, or float64 for float64 arrays (with jax_enable_x64): the metric never computes below float32."""
  return jnp.float64 if dtype == jnp.float64 else jnp.float32
