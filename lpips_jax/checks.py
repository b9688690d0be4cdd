"""The boundary: the checks every public entry point runs before it computes.

Structure, shapes and dtypes are always checked; values (range, NaN, inf) only for concrete arrays, since under
`jax.jit`, `grad` or `vmap` they are unknown. Each failure is an `InputError` (a ValueError) whose one-line message
names the argument, the problem and the fix. Positive integers, spatial sizes and meshes are checked here too, for
every caller.
"""
from __future__ import annotations

import sys
import weakref
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lpips_jax.backbones import NETS
from lpips_jax.errors import InputError
from lpips_jax.layout import Variant, param_shapes

# What to do about params whose arrays are not usable weights.
PARAMS_FIX = "pass the float32 params of lpips_jax.load(net, version), or lpips_jax.load(path) for a weights file"


def params_variant(params) -> Variant:
  """Which net, version and mode `params` describes; raises if it is not a params dict or its keys fit none."""
  problem = _not_params(params)
  if problem:
    raise InputError(problem)
  keys = set(params)
  nets = sorted(keys & NETS.keys())
  if len(nets) != 1:
    raise InputError(f"params must hold exactly one trunk, under one of {sorted(NETS)}; got top-level keys "
                     f"{sorted(keys)}. Get params with lpips_jax.load(net, version).")
  net = nets[0]
  heads = {f"lin{k}" for k in range(len(NETS[net].channels))}
  lpips = bool(keys & heads)
  expected = {net} | ({"scaling"} & keys) | (heads if lpips else set())
  if keys != expected:
    raise InputError(f"params for net {net!r}: missing keys {sorted(expected - keys)}, unexpected keys "
                     f"{sorted(keys - expected)}; expected {sorted(expected)}.")
  if NETS[net].ensemble and not (lpips and "scaling" in keys):
    raise InputError(f"params for net {net!r} (E-LPIPS) need the input scaling and all {len(heads)} heads; missing "
                     f"{sorted(({'scaling'} | heads) - keys)}. Get them with lpips_jax.load('vgg_ensemble').")
  return Variant(net, "scaling" in keys, lpips)


def check_params(params) -> Variant:
  """The variant of `params`, after checking its structure, every array's shape, that every array is real floating
  point, and, for concrete arrays, that every value is finite. Traced params (under jit or grad) are checked for
  structure, shape and dtype only: a NaN weight there gives NaN distances.

  Params whose leaves are all concrete jax arrays (immutable) are checked once: the same arrays in the same
  structure again cost one tree flatten (`lpips_jax.load`'s are recorded as checked when loaded). An edited dict
  (a new array in it), a new pytree, numpy arrays (mutable in place) and tracers are checked at every call.
  """
  return checked_params(params)[0]


def checked_params(params) -> tuple[Variant, bool]:
  """`check_params`'s variant, and whether any of the params is traced (under jit or grad), from one tree flatten:
  the eager `distance` needs both, and pays for every flatten on every call."""
  leaves, key = _checked_key(params)
  known = _CHECKED.get(key) if key is not None else None
  if known is not None and all(ref() is x for ref, x in zip(known[1], leaves)):
    return known[0], False
  v = check_structure(params)
  check_arrays(params, prefix="params ", fix=PARAMS_FIX)
  if key is not None:
    _remember(key, leaves, v)
  return v, key is None and any(isinstance(x, jax.core.Tracer) for x in leaves)


def mark_checked(params, v: Variant) -> None:
  """Record concrete jax-array `params` of variant `v` (from `check_structure`) whose values were checked elsewhere
  (`lpips_jax.load` checks the file's)."""
  leaves, key = _checked_key(params)
  if key is not None:
    _remember(key, leaves, v)


# (treedef, the leaves' ids) of params already checked -> (variant, weak references to the leaves). The references
# tell the same live arrays from new ones that reuse dead ones' ids, without keeping any array alive; the table
# keeps the last _CHECKED_MOST entries.
_CHECKED: dict = {}
_CHECKED_MOST = 32


def _checked_key(params) -> tuple[list, tuple | None]:
  """The leaves of `params` and their `_CHECKED` key; the key is None unless every leaf is a concrete jax array."""
  if not isinstance(params, Mapping):
    return [], None
  leaves, treedef = jax.tree_util.tree_flatten(params)
  if not leaves or not all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) for x in leaves):
    return leaves, None
  return leaves, (treedef, tuple(map(id, leaves)))


def _remember(key: tuple, leaves: list, v: Variant) -> None:
  _CHECKED.pop(key, None)
  _CHECKED[key] = (v, [weakref.ref(x) for x in leaves])
  while len(_CHECKED) > _CHECKED_MOST:
    del _CHECKED[next(iter(_CHECKED))]


def check_structure(params) -> Variant:
  """The variant of `params`, after checking its structure and every array's shape (not the values: `load` has
  checked a file's values already)."""
  v = params_variant(params)
  expected = param_shapes(v.net, v.version, v.lpips)
  got = jax.tree_util.tree_flatten_with_path(params)[0]
  want = dict(jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda s: isinstance(s, tuple))[0])
  problems = [f"{_key(p)}: missing" for p in want if p not in dict(got)]
  problems += [f"{_key(p)}: unexpected" if p not in want else f"{_key(p)}: shape {jnp.shape(x)}, expected "
               f"{want[p]}" for p, x in got if p not in want or tuple(jnp.shape(x)) != want[p]]
  if problems:
    raise InputError(f"params do not fit net {v.net!r}: " + "; ".join(problems))
  return v


def check_arrays(tree, *, prefix: str, fix: str) -> None:
  """Raise an InputError naming the key (after `prefix`) and ending in `fix` unless every array of `tree` is real
  floating point (not integer, bool or complex: those give wrong or complex distances) and, where concrete,
  finite. The one check of weights, for params and for weight files alike."""
  leaves = [(_key(path), x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  for key, x in leaves:
    dtype = _dtype(x)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise InputError(f"{prefix}{key} has dtype {dtype}; LPIPS weights are real floating-point arrays: {fix}")
  concrete = [(key, x) for key, x in leaves if not isinstance(x, jax.core.Tracer) and np.size(x)]
  for (key, x), finite in zip(concrete, _all_finite([x for _, x in concrete]) if concrete else []):
    if not finite:
      raise InputError(f"{prefix}{key} has {_nonfinite(x)}: the weights are damaged (a diverged training run or "
                       f"a bad conversion); {fix}")


def check_images(a, b, net: str, *, normalize: bool = False, names: tuple[str, str] = ("a", "b")) -> None:
  """Raise an InputError naming the problem and the fix unless `a`, `b` are valid LPIPS inputs for `net`: each
  `check_batch`, and of the same shape. `names` are the arguments' names in the messages."""
  check_image_pair(a, b, net, names=names)
  _check_values(dict(zip(names, (a, b))), normalize)


def check_image_pair(a, b, net: str, *, names: tuple[str, str] = ("a", "b")) -> None:
  """What `check_images` checks without looking at values: each image's layout, size and dtype, equal shapes."""
  for name, x in zip(names, (a, b)):
    _check_layout(name, x, net)
  if jnp.shape(a) != jnp.shape(b):
    raise InputError(f"{names[0]} and {names[1]} must have the same shape; got {jnp.shape(a)} and {jnp.shape(b)} "
                     f"(resize one first)")


def values_known(*arrays) -> bool:
  """Whether every array is concrete (not traced) and non-empty: its values can be checked."""
  return all(not isinstance(x, jax.core.Tracer) and np.size(x) for x in arrays)


def value_stats(x) -> jax.Array:
  """[min, max, 1 if every value is finite else 0] of `x`, in its dtype, traceable: the one reduction of a value
  check, computed by `_extrema` or inside the caller's own jitted computation (the eager `distance`). One array per
  image: each output of a computation is one more buffer to read back. Finiteness is its own test: XLA's CPU
  reduction to a minimum need not propagate NaN. It is the sum of x - x, NaN where any value is NaN or infinite (IEEE
  arithmetic, which XLA keeps: it folds x - x to 0 for integers only): one more reduction of the same input, where
  `all(isfinite(x))` compiled to two more kernels (~35 ms of compile time per program on CPU)."""
  return jnp.stack([jnp.min(x), jnp.max(x), (jnp.sum(x - x) == 0).astype(x.dtype)])


def check_image_values(images: dict, stats: list, normalize: bool) -> None:
  """The value check of `images` (name -> concrete array) from their `value_stats` (on the host, `read_back`):
  finite, and within the value range (with 1e-3 of slack for rounding)."""
  for (name, x), (x_min, x_max, finite) in zip(images.items(), stats):
    if not finite and not np.isfinite(np.asarray(x)).all():
      raise InputError(f"{name} has {_nonfinite(x)}; LPIPS is undefined there: find where they come from, or "
                       f"replace them (jnp.nan_to_num)")
    if not finite:  # float64 values beyond float32's range, reduced in float32: the exact extrema
      x_min, x_max = np.asarray(x).min(), np.asarray(x).max()
    lo, hi = (0.0, 1.0) if normalize else (-1.0, 1.0)
    if not (x_min >= lo - 1e-3 and x_max <= hi + 1e-3):
      fix = ("use normalize=True for [0, 1] images, x / 127.5 - 1 for 8-bit values, or clip" if not normalize
             else "pass [-1, 1] images without normalize=True, or clip")
      raise InputError(f"{name} has values in [{x_min:.4g}, {x_max:.4g}], outside the expected [{lo:g}, {hi:g}]: "
                       f"{fix}")


def read_back(tree):
  """`tree` (value stats on a device) on the host: the value checks' one blocking read per call."""
  with jax.ensure_compile_time_eval():
    return jax.device_get(tree)


def check_batch(x, net: str, *, name: str = "x", normalize: bool = False) -> None:
  """Raise an InputError naming `name`, the problem and the fix unless `x` is a batch of LPIPS inputs for `net`:
  NHWC [N, H, W, 3] (N may be 0), H and W at least the net's minimum, floating point, and, if concrete, finite and
  in [-1, 1] ([0, 1] with `normalize`). Traced values (under jit, grad, vmap) are unknown and not checked."""
  _check_layout(name, x, net)
  _check_values({name: x}, normalize)


def check_features(f0, f1, net: str) -> None:
  """Raise an InputError naming the tap and the fix unless `f0`, `f1` are `features` of params of `net`: one tap
  per layer, each floating point, [N, h_l, w_l, C_l] with the net's channels C_l, the same N in every tap, equal
  shapes in `f0` and `f1`, and, if concrete, finite."""
  channels = NETS[net].channels
  for name, f in (("f0", f0), ("f1", f1)):
    if not isinstance(f, (tuple, list)):
      raise InputError(f"{name} is of type {type(f).__name__}; expected the tuple of taps that "
                       f"lpips_jax.features(params, x) returns")
    got = [tuple(jnp.shape(t)) for t in f]
    if len(got) != len(channels) or any(len(s) != 4 or s[-1] != c for s, c in zip(got, channels)):
      other = [n for n, spec in NETS.items() if n != net and [s[-1:] for s in got] == [(c,) for c in spec.channels]]
      hint = f" (these are features of net {other[0]!r})" if other else ""
      raise InputError(f"{name} has taps of shapes {got}; params of net {net!r} need {len(channels)} taps "
                       f"[N, h, w, C] with C = {list(channels)}{hint}: compute them with lpips_jax.features and "
                       f"the same params")
    for k, t in enumerate(f):
      if not jnp.issubdtype(_dtype(t), jnp.floating):
        raise InputError(f"{name}[{k}] has dtype {_dtype(t)}; features are floating point, as "
                         f"lpips_jax.features returns them")
    if len({jnp.shape(t)[0] for t in f}) > 1:
      raise InputError(f"{name}'s taps hold different batch sizes {[jnp.shape(t)[0] for t in f]}; pass the tuple "
                       f"of one lpips_jax.features call")
  for k, (t0, t1) in enumerate(zip(f0, f1)):
    if jnp.shape(t0) != jnp.shape(t1):
      raise InputError(f"f0[{k}] and f1[{k}] have shapes {jnp.shape(t0)} and {jnp.shape(t1)}; features of images "
                       f"of the same shape are needed")
  concrete = [(f"{name}[{k}]", t) for name, f in (("f0", f0), ("f1", f1)) for k, t in enumerate(f)
              if not isinstance(t, jax.core.Tracer) and np.size(t)]
  for (name, t), finite in zip(concrete, _all_finite([t for _, t in concrete]) if concrete else []):
    if not finite:
      raise InputError(f"{name} has {_nonfinite(t)}: features of finite images are finite; check the images or "
                       f"params they came from")


NOT_SPATIAL = ("E-LPIPS has no spatial map: each sample sees the images rescaled, shifted, flipped and transposed; "
               "use spatial maps with LPIPS params (e.g. lpips_jax.load('vgg'))")


def check_sampling(net: str, key, samples, *, spatial: bool = False, concrete: bool = False):
  """E-LPIPS's `key` (returned) and `samples`: required and a `jax.random` key for its nets (`concrete`: not
  traced), a positive integer; for the other nets, which are deterministic, both must be left out."""
  if not NETS[net].ensemble:
    if key is not None or not (isinstance(samples, int) and samples == 1):
      raise InputError(f"key and samples are E-LPIPS's (params of lpips_jax.load('vgg_ensemble')); net {net!r} is "
                       f"deterministic: leave them out")
    return None
  if key is None:
    raise InputError("E-LPIPS averages the distance over random transformations of both images: pass "
                     "key=jax.random.key(seed) (the same key gives the same value; use a new key for new samples, "
                     "e.g. one per training step)")
  dtype = getattr(key, "dtype", None)
  typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and jnp.shape(key) == ()
  raw = dtype == np.uint32 and jnp.shape(key) == (2,)
  if not (typed or raw):
    raise InputError(f"key must be one jax.random key (jax.random.key(seed), or jax.random.PRNGKey(seed)); got "
                     f"{type(key).__name__} of dtype {dtype} and shape {jnp.shape(key)}")
  if concrete and isinstance(key, jax.core.Tracer):
    raise InputError("E-LPIPS features (features, pairwise, diversity) need a concrete key, not one traced under "
                     "jit: the sampled downscaling decides the features' shapes. Call them outside jit, or use "
                     "distance, which takes a traced key")
  check_positive_int(samples, "samples")
  if spatial:
    raise InputError(NOT_SPATIAL)
  return key


def check_positive_int(value, name: str) -> int:
  """`value` as an int, or an InputError naming `name` unless it is a positive integer (not a bool or a float)."""
  if not _is_positive_int(value):
    raise InputError(f"{name} must be a positive integer; got {value!r}")
  return int(value)


def check_mask(mask, count: int | None = None) -> None:
  """An InputError unless `mask` is None or a vector of booleans or 0/1 numbers (one per pair: `count` of them)."""
  if mask is None:
    return
  dtype = _dtype(mask) if hasattr(mask, "dtype") else np.asarray(mask).dtype
  if not (dtype == np.bool_ or jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
    raise InputError(f"mask must be booleans or 0/1 numbers, one per pair (True or 1: counted); got "
                     f"{type(mask).__name__} of dtype {dtype}")
  shape = jnp.shape(mask)
  if len(shape) != 1 or (count is not None and shape[0] != count):
    want = f"({count},)" if count is not None else "(N,)"
    raise InputError(f"mask must have shape {want}, one entry per pair; got {shape}")


def check_spatial_size(spatial_size) -> tuple[int, int] | None:
  """`spatial_size` as (H, W), or None; an InputError unless it is None or two positive integers."""
  if spatial_size is None:
    return None
  if not (isinstance(spatial_size, (tuple, list)) and len(spatial_size) == 2 and
          all(_is_positive_int(n) for n in spatial_size)):
    raise InputError(f"spatial_size must be (H, W), two positive integers (the images' size); got {spatial_size!r}")
  return int(spatial_size[0]), int(spatial_size[1])


def check_nonnegative_int(value, name: str) -> int:
  """`value` as an int, or an InputError naming `name` unless it is an integer >= 0 (not a bool or a float)."""
  if not (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 0):
    raise InputError(f"{name} must be a non-negative integer; got {value!r}")
  return int(value)


def check_mesh(mesh, *, local: bool = False) -> None:
  """An InputError unless `mesh` is None or a 1-D `jax.sharding.Mesh` with axis "data" (with `local`, of this
  process's devices only)."""
  if mesh is None:
    return
  if not isinstance(mesh, jax.sharding.Mesh):
    raise InputError(f"mesh must be a jax.sharding.Mesh with one axis 'data' (e.g. jax.make_mesh((n,), ('data',))); "
                     f"got a {type(mesh).__name__}")
  if mesh.axis_names != ("data",):
    raise InputError(f"mesh must be 1-D with axis 'data'; got axes {mesh.axis_names}")
  if local and not all(d.process_index == jax.process_index() for d in mesh.devices.flat):
    raise InputError("mesh must hold only this process's devices (pairwise runs on one process): use "
                     "jax.make_mesh((jax.local_device_count(),), ('data',), devices=jax.local_devices())")


def _is_positive_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 1


def _not_params(params) -> str | None:
  """Why `params` is not a params dict, with what to pass instead, when it is something else: None, not a dict, an
  NNX state or NNX variables, or linen variables holding the LPIPS weights further down."""
  if params is None:
    return f"params is None; {PARAMS_FIX}"
  # NNX objects exist only once flax.nnx is imported; not importing it here keeps it out of the command's start-up
  # (0.2 s of its 1.5).
  nnx = sys.modules.get("flax.nnx")
  is_variable = lambda x: nnx is not None and isinstance(x, nnx.Variable)
  if nnx is not None and isinstance(params, nnx.State):
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
    raise InputError(f"{name} has shape {shape}; expected a batch of NHWC images [N, H, W, 3]{hint}")
  if shape[-1] != 3:
    if shape[1] == 3:
      raise InputError(f"{name} has shape {shape}, which looks channels-first (NCHW); lpips_jax expects NHWC "
                       f"[N, H, W, 3]: pass x.transpose(0, 2, 3, 1)")
    hint = " (grayscale? repeat it: jnp.repeat(x, 3, axis=-1))" if shape[-1] == 1 else ""
    raise InputError(f"{name} has {shape[-1]} channels (shape {shape}); LPIPS takes RGB images [N, H, W, 3]{hint}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise InputError(f"{name} has dtype {dtype}; expected floating-point images in [-1, 1] (or [0, 1] with "
                     f"normalize=True); for 8-bit images use x.astype(np.float32) / 127.5 - 1")
  h, w = shape[1:3]
  least = NETS[net].min_size
  if h < least or w < least:
    why = ("E-LPIPS downscales by up to 8, after which its network needs 16 pixels" if NETS[net].ensemble else
           "LPIPS was trained on 64x64 patches")
    raise InputError(f"{name}: images of {h}x{w} are too small for net {net!r}: it needs at least {least}x{least} "
                     f"({why}; upsample small images)")


def _check_values(images: dict, normalize: bool) -> None:
  """`check_image_values` of the concrete `images` (traced ones are unknown), their stats from one reduction."""
  concrete = {name: x for name, x in images.items() if values_known(x)}
  if concrete:
    check_image_values(concrete, _extrema(list(concrete.values())), normalize)


def _extrema(arrays: list) -> list[tuple]:
  """`value_stats` of each concrete, non-empty array (the images' check)."""
  return _reduced(arrays, lambda x: (x.min(), x.max(), np.isfinite(x).all()), _device_extrema)


def _all_finite(arrays: list) -> list[bool]:
  """Whether each concrete, non-empty array is finite (the weights' and features' check: no range, so one reduction
  per array and one output for all of them, which compiles in half the time of their `value_stats`: ~0.4 s for
  SqueezeNet's 59 weights on CPU, once per params structure)."""
  return [bool(finite) for finite in _reduced(arrays, lambda x: np.isfinite(x).all(), _device_finite)]


def _reduced(arrays: list, on_host, on_device) -> list:
  """`on_host(x)` of each numpy array, and the results of `on_device(jax_arrays)` for the jax arrays, reduced where
  they live in one jitted call (no copy to the host), also while something else is traced; read back once."""
  device = [i for i, x in enumerate(arrays) if isinstance(x, jax.Array)]
  out = [None if isinstance(x, jax.Array) else on_host(np.asarray(x)) for x in arrays]
  with jax.ensure_compile_time_eval():
    out, values = read_back((out, on_device([arrays[i] for i in device]) if device else []))
  for i, value in zip(device, values):
    out[i] = value
  return out


@jax.jit
def _device_extrema(arrays: list) -> list:
  return [value_stats(x) for x in arrays]


@jax.jit
def _device_finite(arrays: list) -> jax.Array:
  return jnp.stack([jnp.sum(x - x).astype(jnp.float32) for x in arrays]) == 0  # NaN unless finite (`value_stats`)


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
