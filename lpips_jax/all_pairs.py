"""All-pairs LPIPS: the [N, M] distance matrix of two image sets, and the LPIPS diversity of groups of samples.

Each image's features are computed once (`lpips_jax.features`); the distances come from matrix products of the
features, tile by tile, and the entries where that product form loses precision are recomputed in the direct
difference form (`lpips_jax.distance_from_features`). See `pairwise` for its precision, memory bounds and
sharding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lpips_jax import elpips
from lpips_jax.checks import (
  check_batch,
  check_mesh,
  check_nonnegative_int,
  check_params,
  check_positive_int,
  check_sampling,
  params_variant,
)
from lpips_jax.errors import InputError
from lpips_jax.lpips import distance_from_features, features, unit_normalize
from lpips_jax.scoring import local_mesh, padded_batch_size

# Entries with d < RECOMPUTE * (S_i + S_j) are recomputed in the difference form (S: an image's self term, its
# distance to an all-zero feature). Measured over all nets, versions and the baseline, the product form's absolute
# error is at most 3e-7 (S_i + S_j), so above the threshold its relative error is below 3e-5 (5e-6 seen). Pairs of
# distinct images lie above it (random images: d >= 0.05 (S_i + S_j)); a recomputed entry costs ~40 product entries.
RECOMPUTE = 1e-2


def pairwise(params, x, y=None, *, key: jax.Array | None = None, samples: int = 1, normalize: bool = False,
             batch_size: int = 256, dtype=None, precision=None, mesh: jax.sharding.Mesh | None = None,
             cache_bytes: int = 2**31) -> np.ndarray:
  """LPIPS distances between every image of `x` and every image of `y` (of `x` and itself when `y` is None).

  Args:
    params: from `lpips_jax.load(net, version, lpips=...)`.
    x: images [N, H, W, 3] in [-1, 1] (or [0, 1] with `normalize`), at least the net's minimum size.
    y: images [M, H', W', 3] with the same H, W as `x`, or None for the symmetric N x N matrix.
    key, samples: E-LPIPS's, required for its params (a concrete key): the matrix is the mean of `samples`
      matrices, sample k's drawn from `jax.random.fold_in(key, k)` for one pair and applied to every image (the
      same transformation and dropout masks), so each entry is an E-LPIPS estimate of its pair over `samples`
      samples. Each sample computes every image's features again.
    batch_size: images per feature batch and per tile side; the row tile is rounded up to a multiple of the mesh
      size (padded, the padding dropped).
    dtype, precision: the trunk's compute dtype and convolution precision, as in `lpips_jax.distance`; the products
      are float32 at `Precision.HIGHEST` whatever these are.
    mesh: a 1-D mesh with axis "data" of devices of this process (default: all local devices).
    cache_bytes: host memory allowed for the column images' features (below).

  Returns:
    float32 numpy [N, M], entry (i, j) = `distance(params, x[i:i+1], y[j:j+1])`; with `y` None, [N, N], exactly
    symmetric with an exactly zero diagonal.

  How: for layer l with heads w (1 for the baseline), d_l(i, j) = s_l(i) + s_l(j) - (2 / hw) <w f_i, g_j>, with
  s_l = mean_hw sum_c w_c f^2, so a tile is one float32 matrix product per layer over the flattened (h, w, c) axes
  (`Precision.HIGHEST`), clamped at 0, summed in layer order. That form cancels where d is small against S_i + S_j
  (S the sum of an image's s_l; ~1 with heads, the number of layers for the baseline): its absolute error is up to
  3e-7 (S_i + S_j). Entries with d < RECOMPUTE (S_i + S_j) (1e-2: near duplicates) are recomputed in the direct
  form, `distance_from_features` on the same features. In the symmetric case only the upper triangle is computed,
  then mirrored, and the diagonal is 0.

  Precision: the same as `distance`'s own for every pair, down to near duplicates (the recomputed entries); the
  README gives the measured errors.

  Memory: the column images' features are cached on the host when they fit `cache_bytes` (each image then goes
  through the trunk once); otherwise each column tile's features are recomputed for every row tile. Per image
  (64x64, float32): alex 127 KB, squeeze 476 KB, vgg 2.0 MB (scales with H x W). So 10,000 64x64 images with alex
  take 1.3 GB of cache, plus 4 N M bytes for the result, plus the images themselves. Per tile, on device: the row and
  column tiles' features, the weighted row features and the R x C tile, plus one feature batch's trunk activations.
  The README gives measured times and peak memory.

  Sharding: a tile's rows (and each feature batch) are sharded over the mesh's "data" axis, its columns and the
  params replicated, via `jax.jit` with `NamedSharding`.

  Example:
    >>> params = lpips_jax.load("alex")
    >>> x = np.random.default_rng(0).uniform(-1, 1, (5, 64, 64, 3)).astype(np.float32)
    >>> d = pairwise(params, x)                   # [5, 5]; pairwise(params, x, y) -> [5, len(y)]
    >>> bool((d == d.T).all()), float(d[0, 0])
    (True, 0.0)
  """
  net = check_params(params).net
  key = check_sampling(net, key, samples, concrete=True)
  x = _checked(x, "x", net, normalize)
  y = None if y is None else _checked(y, "y", net, normalize)
  return _matrix(params, x, y, key=key, samples=samples, normalize=normalize, batch_size=batch_size, dtype=dtype,
                 precision=precision, mesh=mesh, cache_bytes=cache_bytes)


def diversity(params, samples, **options) -> np.ndarray:
  """LPIPS diversity of groups of samples (BicycleGAN, MUNIT): the mean distance over each group's distinct pairs.

  Args:
    params: from `lpips_jax.load`.
    samples: [G, K, H, W, 3], K >= 2 samples for each of G inputs, in [-1, 1] (or [0, 1] with `normalize=True`).
    **options: passed to `pairwise` (normalize, batch_size, dtype, precision, mesh, cache_bytes; for E-LPIPS key
      and samples: group g's samples are drawn from `jax.random.fold_in(key, g)`).

  Returns:
    float32 numpy [G] ([0] for G = 0): for each group, the mean of `distance` over its K (K - 1) / 2 pairs. One
    `pairwise` matrix per group, so each sample's features are computed once; the params and samples are checked
    once.

  Example:
    >>> params = lpips_jax.load("alex")
    >>> samples = np.random.default_rng(0).uniform(-1, 1, (4, 10, 64, 64, 3)).astype(np.float32)
    >>> diversity(params, samples).shape          # 4 inputs, 10 samples each -> 45 pairs averaged per input
    (4,)
  """
  unknown = set(options) - {"normalize", "batch_size", "dtype", "precision", "mesh", "cache_bytes", "key", "samples"}
  if unknown:
    raise TypeError(f"diversity() got unexpected options {sorted(unknown)}; it passes normalize, batch_size, "
                    f"dtype, precision, mesh, cache_bytes, key and samples to pairwise")
  net = check_params(params).net
  key = check_sampling(net, options.pop("key", None), options.get("samples", 1), concrete=True)
  samples = np.asarray(samples)
  if samples.ndim != 5 or samples.shape[1] < 2:
    raise InputError(f"samples has shape {samples.shape}; expected [G, K, H, W, 3] with K >= 2 samples per group"
                     f"{' (one group? add an axis: samples[None])' if samples.ndim == 4 else ''}")
  _checked(samples.reshape(-1, *samples.shape[2:]), "samples", net, options.get("normalize", False))
  upper = np.triu_indices(samples.shape[1], 1)
  keys = [None if key is None else jax.random.fold_in(key, g) for g in range(len(samples))]
  return np.array([_matrix(params, group, None, key=k, **options)[upper].mean(dtype=np.float64)
                   for k, group in zip(keys, samples)], np.float32).reshape(len(samples))


def _matrix(params, x: np.ndarray, y: np.ndarray | None, *, key=None, samples: int = 1, **options) -> np.ndarray:
  """`pairwise` on checked params and images: E-LPIPS's mean over samples, or LPIPS's one matrix."""
  if key is None:
    return _one_matrix(params, x, y, **options)
  total = 0
  for k in range(samples):  # on the host: each sample's scale level decides its features' shapes
    t, dropout = elpips.drawn(elpips.sample_key(key, k), 1)
    total = total + _one_matrix(params, x, y, sample=(t._replace(scale=None), dropout), scale=int(t.scale),
                                **options).astype(np.float64)
  return (total / samples).astype(np.float32)


def _one_matrix(params, x: np.ndarray, y: np.ndarray | None, *, sample=None, scale: int | None = None,
                normalize: bool = False, batch_size: int = 256, dtype=None, precision=None,
                mesh: jax.sharding.Mesh | None = None, cache_bytes: int = 2**31) -> np.ndarray:
  """One matrix: LPIPS's, or E-LPIPS's under one `sample` (its transformation without the scale level, which is
  `scale`, and its dropout key)."""
  symmetric = y is None
  y = x if symmetric else y
  if x.shape[1:3] != y.shape[1:3]:
    raise InputError(f"x and y must hold images of the same size; got {x.shape[1]}x{x.shape[2]} and "
                     f"{y.shape[1]}x{y.shape[2]} (resize one set first)")
  batch_size = check_positive_int(batch_size, "batch_size")
  cache_bytes = check_nonnegative_int(cache_bytes, "cache_bytes")
  check_mesh(mesh, local=True)
  mesh = mesh or local_mesh()
  n, m = len(x), len(y)
  out = np.zeros((n, m), np.float32)
  if not n or not m:
    return out
  rows = padded_batch_size(min(batch_size, n), mesh)
  cols = rows if symmetric else padded_batch_size(min(batch_size, m), mesh)
  run = _functions(mesh, normalize, dtype, precision, scale)
  params = jax.device_put(params, run.replicated)
  fill = 0.5 if normalize else 0.0  # padding images: valid inputs, their rows and columns are dropped

  def compute(images, start, size):  # features and self terms of images[start:start + size], padded to `size`
    batch = images[start:start + size]
    batch = np.concatenate([batch, np.full((size - len(batch), *batch.shape[1:]), fill, batch.dtype)])
    return run.features(params, jax.device_put(batch, run.data), sample)

  per_image = jax.eval_shape(run.trunk, params, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype), sample)
  cache = None
  if sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(per_image)) * m <= cache_bytes:
    cache = jax.tree.map(lambda a: np.empty((m, *a.shape[1:]), a.dtype), per_image)
    for start in range(0, m, cols):
      count = min(cols, m - start)
      for host, a in zip(jax.tree.leaves(cache), jax.tree.leaves(compute(y, start, cols))):
        host[start:start + count] = np.asarray(a)[:count]

  def cached(start, size, sharding):  # a tile from the host cache, padded with zero features
    take = lambda a: np.concatenate([a[start:start + size], np.zeros((max(start + size - m, 0), *a.shape[1:]),
                                                                     a.dtype)])
    return jax.device_put(jax.tree.map(take, cache), sharding)

  for r in range(0, n, rows):
    row = cached(r, rows, run.data) if symmetric and cache is not None else compute(x, r, rows)
    for c in range(r if symmetric else 0, m, cols):
      if symmetric and c == r:
        col = jax.device_put(row, run.replicated)
      elif cache is not None:
        col = cached(c, cols, run.replicated)
      else:
        col = jax.device_put(compute(y, c, cols), run.replicated)
      d = _tile(run, params, row, col, min(rows, n - r), min(cols, m - c), diagonal=symmetric and c == r)
      out[r:r + d.shape[0], c:c + d.shape[1]] = d
      if symmetric:
        out[c:c + d.shape[1], r:r + d.shape[0]] = d.T
  return out


def _checked(x, name: str, net: str, normalize: bool) -> np.ndarray:
  """`x` as a numpy array, after `check_batch` (its messages naming `name`); an empty batch is allowed."""
  x = np.asarray(x)
  check_batch(x, net, name=name, normalize=normalize)
  return x


def _tile(run: _Functions, params, row, col, n: int, m: int, *, diagonal: bool) -> np.ndarray:
  """The [n, m] distances of a row tile's and a column tile's (features, self terms); on the diagonal of the
  symmetric matrix, the upper triangle mirrored, with a zero diagonal."""
  d = np.array(run.block(params, *row, *col))[:n, :m]
  row_self, col_self = (np.asarray(t[1])[:k].sum(1) for t, k in ((row, n), (col, m)))
  small = d < RECOMPUTE * (row_self[:, None] + col_self[None, :])
  i, j = np.nonzero(np.triu(small, 1) if diagonal else small)
  chunk = row[1].shape[0]  # a chunk of pairs gathers as many features as a row tile and a column tile hold
  for start in range(0, len(i), chunk):  # fixed-size chunks of index pairs (padded with 0): one compilation
    take = lambda v: np.pad(v[start:start + chunk], (0, max(start + chunk - len(v), 0))).astype(np.int32)
    d[i[start:start + chunk], j[start:start + chunk]] = np.asarray(
        run.exact(params, row[0], col[0], take(i), take(j)))[:min(chunk, len(i) - start)]
  if diagonal:
    upper = np.triu(d, 1)
    d = upper + upper.T
  return d


class _Functions:
  """The jitted pieces of `pairwise` for one mesh and one set of trunk options (built once, by `_functions`)."""

  def __init__(self, mesh, normalize, dtype, precision, scale):
    self.data, self.replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    data, replicated = self.data, self.replicated
    trunk = functools.partial(_features, normalize=normalize, dtype=dtype, precision=precision, scale=scale)
    self.trunk = trunk
    self.features = jax.jit(trunk, in_shardings=(replicated, data, replicated), out_shardings=data)
    self.block = jax.jit(_block, in_shardings=(replicated, data, data, replicated, replicated), out_shardings=data)
    self.exact = jax.jit(_exact, in_shardings=(replicated, data, replicated, replicated, replicated),
                         out_shardings=replicated)


@functools.cache
def _functions(mesh, normalize, dtype, precision, scale) -> _Functions:
  return _Functions(mesh, normalize, dtype, precision, scale)


def _features(params, x, sample, *, scale, **options):
  """(features, self terms [B, L]): the self term of layer l is s_l = mean_hw sum_c w_c f^2, the distance to 0.
  E-LPIPS's features are those under `sample`, shared by every image (`_one_matrix`)."""
  if sample is None:
    f = features(params, x, **options)
  else:
    t, dropout = sample
    taps = elpips.taps_under(params_variant(params), params, x, t, scale, dropout, shared=True, **options)
    f = tuple(map(unit_normalize, taps))
  _, selfs = distance_from_features(params, f, tuple(map(jnp.zeros_like, f)), per_layer=True)
  return f, jnp.stack(selfs, axis=1)


def _block(params, f, f_self, g, g_self):
  """The [R, C] tile of distances between features `f` (R images) and `g` (C images), in the product form."""
  terms = []
  lpips = params_variant(params).lpips
  for k, (a, b) in enumerate(zip(f, g)):
    if lpips:
      a = a * params[f"lin{k}"]["kernel"].reshape(1, 1, 1, -1)
    cross = jax.lax.dot_general(a.reshape(len(a), -1), b.reshape(len(b), -1), (((1,), (1,)), ((), ())),
                                precision=jax.lax.Precision.HIGHEST)
    # A distance is >= 0; the cancellation can leave a small negative number.
    hw = a.shape[1] * a.shape[2]
    terms.append(jnp.maximum(f_self[:, k, None] + g_self[None, :, k] - cross * (2 / hw), 0))
  return sum(terms[1:], terms[0])  # in layer order, as the official running sum


def _exact(params, f, g, i, j):
  """Distances [K] between images f[i] and g[j] in the direct difference form, as `distance`."""
  return distance_from_features(params, tuple(a[i] for a in f), tuple(b[j] for b in g))
