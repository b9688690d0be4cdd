"""LPIPS as an evaluation metric: a clu-style accumulator pytree and an NNX metric, both exact over padded batches.

`LPIPSMetric` follows `clu.metrics` (`empty`, `from_model_output`, `merge`, `reduce`, `compute`; the same fields as
`clu.metrics.Std`) without importing clu, so it also sits in a `clu.metrics.Collection`. It keeps sums and a count,
not a running mean: a set scored in uneven batches, or in fixed-size batches whose last one is padded and masked
(the sharded-evaluation idiom of big_vision's `pad_shard_unpad`), gets the exact mean of its pairs' distances.
`NNXLPIPSMetric` is the same state in the style of `flax.nnx.metrics.Average` (`update`, `compute`, `reset`).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from lpips_jax.checks import check_images, check_mask, check_params
from lpips_jax.errors import InputError
from lpips_jax.lpips import distance_of_checked, variant_options


@flax.struct.dataclass
class LPIPSMetric:
  """Sum, sum of squares and count of LPIPS distances: an immutable pytree, usable inside `jax.jit`.

  All fields are float32 scalars. The count is float32 rather than clu's int32, so `compute` needs no int-to-float
  promotion (it works under `jax_numpy_dtype_promotion="strict"`); it counts exactly up to 2**24 pairs.

  Example:
    >>> params = lpips_jax.load("alex")
    >>> @jax.jit
    ... def eval_step(metric, params, a, b, mask):  # params are an argument, not a closed-over constant
    ...   return metric.merge(LPIPSMetric.from_model_output(a, b, params=params, mask=mask))
    >>> a = jnp.zeros((4, 64, 64, 3)); b = jnp.full((4, 64, 64, 3), 0.5)
    >>> metric = eval_step(LPIPSMetric.empty(), params, a, b, jnp.array([True, True, True, False]))  # last: padding
    >>> float(metric.count), metric.compute().shape
    (3.0, ())
  """

  total: jax.Array  # f32 [], sum of the counted distances
  sum_of_squares: jax.Array  # f32 [], sum of their squares (for `std`)
  count: jax.Array  # f32 [], number of counted pairs

  @classmethod
  def empty(cls) -> LPIPSMetric:
    """No pairs: the identity of `merge`. Its `compute()` and `std()` are NaN (0 / 0), as `clu.metrics.Average`."""
    zero = jnp.zeros((), jnp.float32)
    return cls(total=zero, sum_of_squares=zero, count=zero)

  @classmethod
  def from_distances(cls, distances: ArrayLike, mask: ArrayLike | None = None) -> LPIPSMetric:
    """The accumulator of precomputed distances [N] (e.g. from `lpips_jax.score_pairs`); `mask` as below."""
    d = jnp.asarray(distances).astype(jnp.float32)
    if d.ndim != 1:
      raise InputError(f"distances must be a vector [N]; got shape {d.shape}")
    if mask is None:
      return cls(total=jnp.sum(d), sum_of_squares=jnp.sum(d * d), count=jnp.float32(d.shape[0]))
    check_mask(mask, d.shape[0])
    keep = jnp.asarray(mask)
    keep = keep if keep.dtype == jnp.bool_ else keep != 0
    # `where`, not `d * mask`: a padded pair whose distance is NaN or inf (garbage padding) must not leak in.
    d = jnp.where(keep, d, 0.0)
    return cls(total=jnp.sum(d), sum_of_squares=jnp.sum(d * d), count=jnp.sum(keep.astype(jnp.float32)))

  @classmethod
  def from_model_output(cls, predictions: ArrayLike, targets: ArrayLike, *, params, mask: ArrayLike | None = None,
                        normalize: bool = False, dtype=None, precision=None, key=None, samples: int = 1,
                        **_) -> LPIPSMetric:
    """The accumulator of one batch: `lpips_jax.distance(params, predictions, targets, ...)` summed over its pairs.

    Args:
      predictions, targets: float images NHWC [N, H, W, 3] in [-1, 1] (or [0, 1] with `normalize=True`).
      params: from `lpips_jax.load`; pass them as an argument of the jitted step.
      mask: [N] bool or 0/1; pairs where it is False/0 (padding) are left out exactly. None counts every pair.
      normalize, dtype, precision: as in `lpips_jax.distance`.
      key, samples: E-LPIPS's (`lpips_jax.distance`): required for its params, a new key for each batch.
      **_: other model outputs, ignored: a `clu.metrics.Collection` passes every output to every metric.

    The params and images are checked as by `lpips_jax.distance`; values only where concrete, and only in the pairs
    the mask counts (padding may hold anything). Inside a jitted step values are unknown: a NaN pixel gives a NaN
    distance, which reaches the mean unless its pair is masked out.
    """
    v = check_params(params)
    check_mask(mask, jnp.shape(predictions)[0] if jnp.ndim(predictions) else None)
    check_images(*_counted(mask, predictions, targets), v.net, normalize=normalize, names=("predictions", "targets"))
    d = distance_of_checked(params, predictions, targets, variant=v, per_layer=False, normalize=normalize,
                            dtype=dtype, precision=precision, **variant_options(v, key, samples, False))
    return cls.from_distances(d, mask)

  def merge(self, other: LPIPSMetric) -> LPIPSMetric:
    """The accumulator of both sets of pairs (associative and commutative up to float32 rounding)."""
    return jax.tree.map(jnp.add, self, other)

  def reduce(self) -> LPIPSMetric:
    """Merge a stack of accumulators along their leading axis, e.g. after `jax.lax.all_gather` (clu's `reduce`)."""
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), self)

  def compute(self) -> jax.Array:
    """The mean distance over the counted pairs, f32 []; NaN if none were counted."""
    return self.total / self.count

  def std(self, *, ddof: int = 0) -> jax.Array:
    """The standard deviation of the counted distances, f32 [] (ddof=1: the sample estimate); NaN if count <= ddof.

    Computed as E[d^2] - E[d]^2 from the sums, clipped at 0: accurate to about 1e-3 relative while the std is above
    ~1e-3 of the mean, which holds for any real set of LPIPS distances; for a tighter figure use the distances
    themselves (`lpips_jax.stats.bootstrap_ci`).
    """
    mean = self.total / self.count
    variance = jnp.maximum(self.sum_of_squares / self.count - mean * mean, 0.0)
    dof = self.count - ddof
    return jnp.where(dof > 0, jnp.sqrt(variance * self.count / jnp.where(dof > 0, dof, 1.0)), jnp.nan)


def _counted(mask, a, b) -> tuple:
  """The pairs of `a`, `b` that a concrete `mask` counts, for the value checks; `a`, `b` unchanged otherwise."""
  if mask is None or any(isinstance(x, jax.core.Tracer) for x in (mask, a, b)):
    return a, b
  keep = np.asarray(mask) != 0
  if keep.ndim != 1 or np.shape(a) != np.shape(b) or np.ndim(a) < 1 or len(a) != len(keep):
    return a, b  # the shape checks report it
  return tuple(x[keep] if isinstance(x, jax.Array) else np.asarray(x)[keep] for x in (a, b))


class NNXLPIPSMetric(nnx.metrics.Metric):
  """The mean LPIPS distance as a stateful NNX metric, in the style of `flax.nnx.metrics.Average`.

  The state is that of `LPIPSMetric` (sum, sum of squares and count, float32 `nnx.metrics.MetricState`s), updated in
  place; `update` works under `nnx.jit`. The distance options are fixed at construction, the params are passed to
  every `update`, so they stay an argument of the jitted step.

  Example:
    >>> params = lpips_jax.load("alex")
    >>> metric = NNXLPIPSMetric()
    >>> a = jnp.zeros((4, 64, 64, 3)); b = jnp.full((4, 64, 64, 3), 0.5)
    >>> metric.update(predictions=a, targets=b, params=params, mask=jnp.array([1, 1, 0, 0]))
    >>> float(metric.count[...])
    2.0
    >>> metric.reset(); bool(jnp.isnan(metric.compute()))
    True
  """

  def __init__(self, *, normalize: bool = False, dtype=None, precision=None):
    """`normalize`, `dtype`, `precision`: as in `lpips_jax.distance`, for every update."""
    self.normalize, self.dtype, self.precision = normalize, dtype, precision
    empty = LPIPSMetric.empty()
    self.total = nnx.metrics.MetricState(empty.total)
    self.sum_of_squares = nnx.metrics.MetricState(empty.sum_of_squares)
    self.count = nnx.metrics.MetricState(empty.count)

  def reset(self) -> None:
    """Forget every pair: `compute()` is NaN again."""
    self._set(LPIPSMetric.empty())

  def update(self, *, predictions: ArrayLike, targets: ArrayLike, params, mask: ArrayLike | None = None,
             key=None, samples: int = 1, **_) -> None:
    """Add a batch, as `LPIPSMetric.from_model_output` (other keyword arguments are ignored, for `nnx.MultiMetric`)."""
    batch = LPIPSMetric.from_model_output(predictions, targets, params=params, mask=mask, normalize=self.normalize,
                                          dtype=self.dtype, precision=self.precision, key=key, samples=samples)
    self._set(self.state().merge(batch))

  def compute(self) -> jax.Array:
    """The mean distance over every pair added since the last reset, f32 []; NaN if none."""
    return self.state().compute()

  def std(self, *, ddof: int = 0) -> jax.Array:
    """The standard deviation of the distances, as `LPIPSMetric.std`."""
    return self.state().std(ddof=ddof)

  def state(self) -> LPIPSMetric:
    """The current state as an immutable `LPIPSMetric` accumulator (to merge with others, or across hosts)."""
    return LPIPSMetric(total=self.total[...], sum_of_squares=self.sum_of_squares[...], count=self.count[...])

  def _set(self, state: LPIPSMetric) -> None:
    self.total[...] = state.total
    self.sum_of_squares[...] = state.sum_of_squares
    self.count[...] = state.count
