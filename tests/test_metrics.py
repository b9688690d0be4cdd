"""The LPIPS accumulator over uneven, masked and sharded batches equals the mean of `distance`; NNX and clu use."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import lpips_jax
from lpips_jax.metrics import LPIPSMetric, NNXLPIPSMetric

SIZE = 32  # alex needs 31 pixels


@functools.cache
def alex():
  return lpips_jax.load("alex")


def pairs(n, seed):
  rng = np.random.default_rng(seed)
  a = rng.uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)
  return a, np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)


@functools.cache
def batches():
  """Two uneven batches, of 5 pairs with an int 0/1 mask and of 8 with a bool mask (each shape compiles anew)."""
  return [(*pairs(5, 0), np.array([1, 0, 1, 1, 1], np.int32)), (*pairs(8, 2), np.array([1, 1, 1, 1, 1, 0, 1, 0], bool))]


@functools.cache
def valid_distances():
  """The distances of the 4 + 6 counted pairs of `batches()`, by plain `lpips_jax.distance` calls, float64."""
  return np.concatenate([np.asarray(lpips_jax.distance(alex(), a, b), np.float64)[mask != 0]
                         for a, b, mask in batches()])


@jax.jit
def eval_step(metric, params, a, b, mask):
  return metric.merge(LPIPSMetric.from_model_output(a, b, params=params, mask=mask))


def test_uneven_masked_batches_under_jit_give_the_mean_distance():
  metric = LPIPSMetric.empty()
  for a, b, mask in batches():
    if mask.dtype == bool:  # padding whose distance is NaN must still be left out exactly
      a, b = (np.where(mask[:, None, None, None], x, np.nan) for x in (a, b))
    metric = eval_step(metric, alex(), a, b, mask)
  d = valid_distances()
  assert metric.count == 10 and all(x.dtype == jnp.float32 and x.shape == () for x in jax.tree.leaves(metric))
  np.testing.assert_allclose(metric.compute(), np.mean(d), rtol=0, atol=1e-6)
  np.testing.assert_allclose(metric.std(), np.std(d), rtol=0, atol=1e-6)
  np.testing.assert_allclose(metric.std(ddof=1), np.std(d, ddof=1), rtol=0, atol=1e-6)


def test_sharded_batches_over_eight_devices_give_the_mean_distance():
  mesh = jax.make_mesh((8,), ("data",))
  data, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
  params = jax.device_put(alex(), replicated)
  metric, expected = jax.device_put(LPIPSMetric.empty(), replicated), []
  for n, valid, seed in ((16, 11, 3), (16, 5, 4)):  # the last pairs of each batch are padding (zeros)
    a, b = pairs(n, seed)
    a[valid:], b[valid:] = 0, 0
    mask = np.arange(n) < valid
    expected.append(np.asarray(lpips_jax.distance(alex(), a, b), np.float64)[:valid])
    a, b, mask = (jax.device_put(x, data) for x in (a, b, mask))
    assert len(a.sharding.device_set) == 8
    metric = eval_step(metric, params, a, b, mask)
  assert metric.count == 16
  np.testing.assert_allclose(metric.compute(), np.mean(np.concatenate(expected)), rtol=0, atol=1e-6)


@pytest.fixture
def example_pairs(examples):
  return np.concatenate([examples["ex_p0"], examples["ex_p1"]]), np.concatenate([examples["ex_ref"]] * 2)


def test_the_example_images_average_the_published_distances(example_pairs):
  # In [0, 1] with normalize=True, which must reach `distance` (without it the values are far off).
  p, ref = (x / 2 + 0.5 for x in example_pairs)
  metric = LPIPSMetric.from_model_output(p, ref, params=alex(), normalize=True)
  np.testing.assert_allclose(metric.compute(), (0.721881 + 0.137566) / 2, atol=1e-6)  # README / official values
  np.testing.assert_allclose(metric.std(), (0.721881 - 0.137566) / 2, atol=1e-6)


def test_merge_is_associative_and_commutative_and_empty_is_its_identity():
  rng = np.random.default_rng(5)
  x, y, z = (LPIPSMetric.from_distances(rng.uniform(0, 1, n), rng.uniform(size=n) < 0.7) for n in (7, 1, 20))
  orders = [x.merge(y).merge(z), x.merge(y.merge(z)), z.merge(x).merge(y), y.merge(z.merge(x))]
  for m in orders[1:]:
    for got, want in zip(jax.tree.leaves(m), jax.tree.leaves(orders[0])):
      np.testing.assert_allclose(got, want, rtol=1e-6)
  for m in (x, orders[0]):
    assert m.merge(LPIPSMetric.empty()) == m and LPIPSMetric.empty().merge(m) == m  # exactly: adding zeros
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), x, y, z)  # as after jax.lax.all_gather
  for got, want in zip(jax.tree.leaves(stacked.reduce()), jax.tree.leaves(orders[0])):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_from_distances_equals_numpy():
  d = np.random.default_rng(6).uniform(0, 1, 50)
  keep = np.arange(50) % 3 != 0
  m = LPIPSMetric.from_distances(d, keep.astype(np.float32))
  assert m.count == int(keep.sum())
  np.testing.assert_allclose([m.compute(), m.std(), m.std(ddof=1)],
                             [d[keep].mean(), d[keep].std(), d[keep].std(ddof=1)], rtol=1e-5)


def test_empty_and_fully_masked_compute_nan():
  # Nothing counted: the mean is 0 / 0 = NaN (as clu.metrics.Average and nnx.metrics.Average), never 0, which
  # would read as "identical images".
  for m in (LPIPSMetric.empty(), LPIPSMetric.from_distances(np.ones(3), np.zeros(3, bool))):
    assert m.count == 0 and np.isnan(m.compute()) and np.isnan(m.std())
  one = LPIPSMetric.from_distances(np.array([0.3]))
  assert one.std() == 0 and np.isnan(one.std(ddof=1))  # the sample std needs two pairs


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match=r"mask must have shape \(3,\), one entry per pair; got \(2,\)"):
    LPIPSMetric.from_distances(np.zeros(3), np.ones(2, bool))
  with pytest.raises(ValueError, match=r"distances must be a vector \[N\]; got shape \(2, 3\)"):
    LPIPSMetric.from_distances(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="same shape"):  # from lpips_jax.distance
    LPIPSMetric.from_model_output(np.zeros((2, SIZE, SIZE, 3)), np.zeros((3, SIZE, SIZE, 3)), params=alex())


def test_nnx_metric_agrees_eagerly_and_under_nnx_jit():
  expected = LPIPSMetric.empty()
  for a, b, mask in batches():
    expected = eval_step(expected, alex(), a, b, mask)
  eager = NNXLPIPSMetric()
  for a, b, mask in batches():
    eager.update(predictions=a, targets=b, params=alex(), mask=mask)
  assert eager.count[...] == 10
  np.testing.assert_allclose(eager.compute(), expected.compute(), rtol=1e-6)
  np.testing.assert_allclose(eager.std(ddof=1), expected.std(ddof=1), rtol=1e-5)
  np.testing.assert_allclose(eager.compute(), np.mean(valid_distances()), atol=1e-6)

  jitted = NNXLPIPSMetric()  # one batch only: each batch shape is another compilation
  update = nnx.jit(lambda metric, params, a, b, mask: metric.update(predictions=a, targets=b, params=params,
                                                                    mask=mask))
  update(jitted, alex(), *batches()[1])
  assert jitted.count[...] == 6
  np.testing.assert_allclose(jitted.compute(), np.mean(valid_distances()[4:]), atol=1e-6)
  eager.reset()
  assert eager.count[...] == 0 and np.isnan(eager.compute())


def test_nnx_metric_in_a_multimetric():
  a, b, mask = batches()[0]
  metrics = nnx.MultiMetric(lpips=NNXLPIPSMetric(), loss=nnx.metrics.Average("loss"))
  metrics.update(predictions=a, targets=b, params=alex(), mask=mask, loss=jnp.float32(2.0))
  with jax.numpy_dtype_promotion("standard"):  # nnx's Average divides a float32 sum by an int32 count
    values = metrics.compute()
  np.testing.assert_allclose(values["lpips"], np.mean(valid_distances()[:4]), atol=1e-6)
  assert values["loss"] == 2.0


def test_in_a_clu_collection_and_gathered_over_eight_devices():
  import clu.metrics as clu_metrics  # in the test extra
  import flax.struct

  @flax.struct.dataclass
  class Metrics(clu_metrics.Collection):
    lpips: LPIPSMetric
    loss: clu_metrics.Average.from_output("loss")

  a, b, mask = batches()[0]
  loss = np.mean((a - b) ** 2, axis=(1, 2, 3))
  metrics = Metrics.empty().merge(Metrics.single_from_model_output(predictions=a, targets=b, params=alex(),
                                                                   mask=mask, loss=loss))
  with jax.numpy_dtype_promotion("standard"):  # clu's Average divides a float32 sum by an int32 count
    values = metrics.compute()
  np.testing.assert_allclose(values["lpips"], np.mean(valid_distances()[:4]), atol=1e-6)
  np.testing.assert_allclose(values["loss"], np.mean(loss[mask == 1]), rtol=1e-6)  # the mask reached it too

  # Each of 8 devices scores its shard; gather_from_model_output all-gathers and reduces (LPIPSMetric.reduce).
  mesh = jax.make_mesh((8,), ("data",))
  spec = PartitionSpec("data")
  a, b, mask = (jax.device_put(x, NamedSharding(mesh, spec)) for x in batches()[1])

  def per_device(params, a, b, mask):
    return Metrics.gather_from_model_output(axis_name="data", predictions=a, targets=b, params=params, mask=mask,
                                            loss=jnp.mean((a - b) ** 2, axis=(1, 2, 3)))

  # check_vma=False: JAX types an all_gather's result as device-varying, though it is equal on every device.
  gathered = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(), spec, spec, spec),
                                   out_specs=PartitionSpec(), check_vma=False))(alex(), a, b, mask)
  assert gathered.lpips.count == 6
  np.testing.assert_allclose(gathered.lpips.compute(), np.mean(valid_distances()[4:]), atol=1e-6)
