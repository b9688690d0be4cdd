"""Percentile-bootstrap confidence intervals for scores that are means, resampling the independent units, in numpy.

A bootstrap is right only if it resamples what is independent:
  - items (`bootstrap_ci`, `paired_bootstrap`): the distances of pairs of distinct files (the command's `REF IMG...`
    and `DIR0 DIR1` modes, `score_pairs`), 2AFC agreements per triplet
    (`(d0 < d1) * (1 - judge) + (d1 < d0) * judge + (d0 == d1) * 0.5`, the official `score_2afc_dataset`), or the
    per-group values of `lpips_jax.diversity` (each group is a unit);
  - images (`all_pairs_bootstrap_ci`): the N(N-1)/2 distances among N images of one set share their images (each
    is in N-1 pairs), so it is the images that are resampled, with the pairs they form.
Resampling is vectorised in chunks of about `_CHUNK` drawn values at a time, and the result depends only on the
seed, not on the chunk size.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from lpips_jax.errors import InputError

_CHUNK = 1 << 22  # indices drawn at once: 32 MB of int64 plus 32 MB of gathered float64 values
LEAST_ITEMS = 2  # an interval from one item would have zero width: there is nothing to resample
LEAST_IMAGES = 3  # all pairs of 2 images are one pair


class Interval(NamedTuple):
  mean: float  # the mean of the values (not of the resampled means)
  low: float  # the (1 - confidence) / 2 percentile of the resampled means
  high: float  # the (1 + confidence) / 2 percentile


class PairedDifference(NamedTuple):
  difference: float  # mean(a) - mean(b) = mean(a - b)
  low: float  # its percentile-bootstrap interval, as in `Interval`
  high: float
  p_value: float  # two-sided bootstrap p-value of "no difference" (see `paired_bootstrap`)


def bootstrap_ci(values: ArrayLike, *, confidence: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> Interval:
  """The mean of per-item `values` [N] with its percentile-bootstrap confidence interval.

  Each of `resamples` resamples draws N items with replacement (numpy's `default_rng(seed)`); the interval spans
  the central `confidence` fraction of their means (`np.quantile`, linear interpolation). It assumes the items are
  independent; for the distances of all pairs of one image set, which share their images, use
  `all_pairs_bootstrap_ci`.

  Args:
    values: finite numbers, N >= 2 (any shape is flattened), e.g. LPIPS distances or 2AFC agreements.
    confidence: in (0, 1).
    resamples: number of bootstrap resamples, >= 1.
    seed: the seed of the resampling; equal seeds give equal results.

  Returns:
    `Interval(mean, low, high)`, floats.

  Example:
    >>> d0, d1 = np.array([.1, .4, .3, .2]), np.array([.3, .2, .5, .6])  # distances of p0, p1 to the reference
    >>> judge = np.array([1.0, 0.2, 0.8, 0.6])  # the fraction of people who preferred p1
    >>> agree = (d0 < d1) * (1 - judge) + (d1 < d0) * judge + (d0 == d1) * 0.5
    >>> score = bootstrap_ci(agree, resamples=2000)  # the 2AFC score and its 95% interval
    >>> round(score.mean, 3), score.low <= score.mean <= score.high
    (0.2, True)
  """
  level = _check_options(confidence, resamples, seed)
  x = _check("values", values)
  means = _resampled_means(x, resamples, np.random.default_rng(seed))
  low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return Interval(_mean(x), float(low), float(high))


def paired_bootstrap(a: ArrayLike, b: ArrayLike, *, confidence: float = 0.95, resamples: int = 10_000,
                     seed: int = 0) -> PairedDifference:
  """How much the mean of `a` exceeds that of `b` when both score the same N items, with a CI and a p-value.

  Items are resampled jointly (the same indices for `a` and `b`), so what the two scores share per item (an easy
  triplet is easy for both metrics) cancels, which makes this much tighter than two separate intervals.
  The p-value is `2 * min(P*(diff <= 0), P*(diff >= 0))` over the resampled differences, with one pseudo-count
  each so it is never 0, capped at 1: it is below `1 - confidence` about exactly when the interval excludes 0. A
  difference that is the same on every item has no spread to resample: an InputError, not an interval.

  Args:
    a, b: per-item values of two metrics on the same items, finite, N >= 2 each (flattened), item i of `a`
      paired with item i of `b`.
    confidence, resamples, seed: as in `bootstrap_ci`.

  Returns:
    `PairedDifference(difference, low, high, p_value)`, floats.

  Example:
    >>> rng = np.random.default_rng(0)
    >>> hard = rng.uniform(0, 1, 500)  # per-item difficulty, shared by both metrics
    >>> a, b = hard + rng.normal(0.1, 0.05, 500), hard + rng.normal(0.0, 0.05, 500)
    >>> result = paired_bootstrap(a, b, resamples=2000)
    >>> result.low > 0, result.p_value < 0.01
    (True, True)
  """
  level = _check_options(confidence, resamples, seed)
  x, y = _check("a", a, least=0), _check("b", b, least=0)
  if x.size != y.size:
    raise InputError(f"a and b must score the same items; got {x.size} and {y.size} values")
  _check("a", x)
  scale = max(_scale(x), _scale(y))
  diff = x / scale - y / scale  # exact unless the values are near float64's top, where a - b could overflow
  if np.all(diff == diff[0]):
    raise InputError(f"a - b is {diff[0] * scale:g} on every one of the {diff.size} items: the difference has no "
                     f"spread to resample, so there is no interval or p-value; report the difference itself")
  means = _resampled_means(diff, resamples, np.random.default_rng(seed))
  low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  tail = min(int(np.count_nonzero(means <= 0)), int(np.count_nonzero(means >= 0)))
  p_value = min(1.0, 2 * (tail + 1) / (resamples + 1))
  return PairedDifference(scale * _mean(diff), scale * float(low), scale * float(high), p_value)


def all_pairs_bootstrap_ci(matrix: ArrayLike, *, confidence: float = 0.95, resamples: int = 10_000,
                           seed: int = 0) -> Interval:
  """The mean distance over all pairs of N images, with a percentile-bootstrap interval that resamples the images.

  Each resample draws N images with replacement (counts c, numpy's `default_rng(seed)`); its statistic is the mean
  over the pairs of distinct draws, `sum_{i != j} c_i c_j D_ij / sum_{i != j} c_i c_j` (two draws of one image are
  not a pair; a resample of one image drawn N times has no pair and is left out). This is the interval of "the
  mean distance of images like these" (a U-statistic: its standard error is about 2 sigma_1 / sqrt(N), sigma_1 the
  spread of each image's mean distance), several times wider than resampling the pairs as if independent.

  Args:
    matrix: the symmetric [N, N] distances (`lpips_jax.pairwise(params, x)`, or `pairs_matrix` of the values in
      pair order), N >= 3, finite off the diagonal; the diagonal is ignored.
    confidence, resamples, seed: as in `bootstrap_ci`.

  Returns:
    `Interval(mean, low, high)`: `mean` is the plain mean over the N(N-1)/2 pairs.
  """
  level = _check_options(confidence, resamples, seed)
  d = np.asarray(matrix, np.float64)
  if d.ndim != 2 or d.shape[0] != d.shape[1]:
    raise InputError(f"matrix has shape {d.shape}; expected the square [N, N] matrix of distances (pairs_matrix "
                     f"turns the values of all pairs, in pair order, into one)")
  n = d.shape[0]
  if n < LEAST_IMAGES:
    raise InputError(f"matrix holds {n} image{'s' * (n != 1)}; an interval over the images needs at least "
                     f"{LEAST_IMAGES} (the resamples of 2 images all hold their one pair)")
  d = d.copy()
  np.fill_diagonal(d, 0.0)
  _check("matrix", d)
  if not np.array_equal(d, d.T):
    i, j = np.argwhere(d != d.T)[0]
    raise InputError(f"matrix is not symmetric (entry [{i}, {j}] is {d[i, j]}, entry [{j}, {i}] is {d[j, i]}); "
                     f"pass the distances of one set with itself")
  rng = np.random.default_rng(seed)
  scale = _scale(d)
  d = d / scale
  rows = max(1, _CHUNK // n)  # resamples per chunk: the counts [rows, N] and their product with D
  stats = np.empty(resamples, np.float64)
  for start in range(0, resamples, rows):
    stop = min(start + rows, resamples)
    counts = rng.multinomial(n, np.full(n, 1 / n), size=stop - start).astype(np.float64)
    total = np.einsum("ri,ri->r", counts @ d, counts)  # sum_{i != j} c_i c_j D_ij: the diagonal is 0
    pairs = counts.sum(1) ** 2 - (counts * counts).sum(1)  # sum_{i != j} c_i c_j
    stats[start:stop] = np.where(pairs > 0, total / np.maximum(pairs, 1), np.nan)
  # A resample that drew one image N times holds no pair (probability N^(1-N): 1/9 for 3 images): left out.
  low, high = np.nanquantile(stats, [(1 - level) / 2, (1 + level) / 2])
  return Interval(scale * float(d[np.triu_indices(n, 1)].mean()), scale * float(low), scale * float(high))


def pairs_matrix(values: ArrayLike, n: int) -> np.ndarray:
  """The symmetric [n, n] matrix (zero diagonal) of the distances of all pairs (i < j) of n images, given in
  `itertools.combinations(range(n), 2)` order (the command's all-pairs rows)."""
  v = np.asarray(values, np.float64).reshape(-1)
  if v.size != n * (n - 1) // 2:
    raise InputError(f"{v.size} values are not the pairs of {n} images, which are {n * (n - 1) // 2}")
  out = np.zeros((n, n), np.float64)
  out[np.triu_indices(n, 1)] = v
  return out + out.T


def _resampled_means(x: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
  """The means of `resamples` resamples with replacement of `x`, float64 [resamples].

  Chunked draws consume the generator exactly as one draw of shape [resamples, N] (or one draw per resample)
  would, so the chunk size never changes the result.
  """
  n = x.size
  rows = max(1, _CHUNK // n)
  scale = _scale(x)
  x = x / scale
  means = np.empty(resamples, np.float64)
  for start in range(0, resamples, rows):
    stop = min(start + rows, resamples)
    means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
  return means * scale


def _mean(x: np.ndarray) -> float:
  """The mean of finite values, never inf (the sum of three values of 1e308 overflows, their mean does not)."""
  scale = _scale(x)
  return float(np.mean(x / scale) * scale)


def _scale(x: np.ndarray) -> float:
  """What to divide finite values by so that no sum of them overflows: 1 (exact) unless they are near the top of
  float64's range, else their largest magnitude."""
  top = float(np.abs(x).max()) if x.size else 0.0
  return top if top > 1e300 else 1.0


def _check(name: str, values: ArrayLike, least: int = LEAST_ITEMS) -> np.ndarray:
  try:
    x = np.asarray(values, np.float64).reshape(-1)
  except (TypeError, ValueError):
    raise InputError(f"{name} must be numbers (an array or a list of floats); got {type(values).__name__} "
                     f"{values!r:.60}") from None
  if x.size == 0:
    raise InputError(f"{name} is empty; a bootstrap needs at least {LEAST_ITEMS} values")
  if x.size < least:
    raise InputError(f"{name} holds 1 value; a bootstrap interval needs at least {LEAST_ITEMS} (one item has no "
                     f"spread to resample)")
  bad = ~np.isfinite(x)
  if bad.any():
    raise InputError(f"{name} holds {np.count_nonzero(bad)} non-finite values (first at flat index "
                     f"{np.flatnonzero(bad)[0]}: {x[bad][0]}); drop or fix them first")
  return x


def _check_options(confidence: float, resamples: int, seed: int) -> float:
  real = isinstance(confidence, (int, float, np.integer, np.floating)) and not isinstance(confidence, bool)
  if not (real and 0 < confidence < 1):
    raise InputError(f"confidence must be in (0, 1), a number such as 0.95; got {confidence!r}")
  if not _is_int(resamples) or resamples < 1:
    raise InputError(f"resamples must be a positive integer, e.g. 10_000; got {resamples!r}")
  if not _is_int(seed) or seed < 0:
    raise InputError(f"seed must be a non-negative integer (numpy's default_rng seeds); got {seed!r}")
  return float(confidence)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
