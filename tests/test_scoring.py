"""Sharded scoring on 8 fake CPU devices, and `distance` inside pmap and shard_map, equal the plain call."""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import lpips_jax
from lpips_jax.scoring import score_pairs


@functools.cache
def params_of(net):
  return lpips_jax.load(net)


def pairs(n, size=40, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
  return a, np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)


def test_eight_devices_are_there():
  assert jax.device_count() == 8


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
@pytest.mark.parametrize("n", [13, 21])
def test_sharded_scoring_equals_single_device(net, n):
  a, b = pairs(n)
  single = np.asarray(lpips_jax.distance(params_of(net), a, b))
  sharded = score_pairs(params_of(net), a, b, batch_size=8)
  assert sharded.shape == (n,)
  np.testing.assert_allclose(sharded, single, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("batch_size", [3, 12])  # rounded up to 8 and 16 on the 8 devices
def test_batch_sizes_not_divisible_by_the_device_count(batch_size):
  a, b = pairs(29)
  np.testing.assert_allclose(score_pairs(params_of("alex"), a, b, batch_size=batch_size),
                             lpips_jax.distance(params_of("alex"), a, b), atol=1e-6, rtol=1e-6)


def test_the_engine_keeps_order_and_drops_padding_for_several_inputs_and_outputs():
  from lpips_jax.scoring import run_batches

  a, b = pairs(11)
  batches = [(a[:5], b[:5], a[:5]), (a[5:], b[5:], a[5:])]
  out = list(run_batches(_two_distances, params_of("alex"), batches, batch_size=5))
  assert [len(o[0]) for o in out] == [5, 6]  # padded to 8 on the devices, returned unpadded
  d0 = np.concatenate([o[0] for o in out])
  np.testing.assert_allclose(d0, lpips_jax.distance(params_of("alex"), a, b), atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(np.concatenate([o[1] for o in out]), np.zeros(11), atol=1e-7)  # d(x, x)


def _two_distances(params, x, y, z):
  return lpips_jax.distance(params, x, y), lpips_jax.distance(params, x, z)


def test_scoring_an_iterator_of_batches():
  a, b = pairs(19)
  batches = ((a[i:i + 5], b[i:i + 5]) for i in range(0, 19, 5))
  np.testing.assert_allclose(score_pairs(params_of("alex"), batches, batch_size=8),
                             lpips_jax.distance(params_of("alex"), a, b), atol=1e-6, rtol=1e-6)


def test_distance_under_pmap_equals_the_plain_call():
  a, b = pairs(16)
  params = params_of("alex")
  mapped = jax.pmap(lpips_jax.distance, in_axes=(None, 0, 0))(params, a.reshape(8, 2, 40, 40, 3),
                                                                b.reshape(8, 2, 40, 40, 3))
  np.testing.assert_allclose(np.asarray(mapped).reshape(-1), lpips_jax.distance(params, a, b), atol=1e-6, rtol=1e-6)


def test_distance_under_shard_map_and_on_sharded_inputs_equals_the_plain_call():
  a, b = pairs(16)
  params = params_of("squeeze")
  mesh = jax.make_mesh((8,), ("data",))
  spec = PartitionSpec("data")
  per_shard = jax.shard_map(lambda x, y: lpips_jax.distance(params, x, y), mesh=mesh, in_specs=(spec, spec),
                            out_specs=spec)
  plain = lpips_jax.distance(params, a, b)
  sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (a, b)]
  np.testing.assert_allclose(jax.jit(per_shard)(*sharded), plain, atol=1e-6, rtol=1e-6)
  out = jax.jit(lpips_jax.distance)(params, *sharded)
  np.testing.assert_allclose(out, plain, atol=1e-6, rtol=1e-6)


def test_cached_target_features_give_the_plain_distance():
  a, b = pairs(4)
  params = params_of("vgg")
  target = jax.jit(lpips_jax.features)(params, b)  # computed once, reused for every prediction
  for shift in (0.0, 0.1):
    x = np.clip(a + shift, -1, 1)
    np.testing.assert_allclose(lpips_jax.distance_from_features(params, lpips_jax.features(params, x), target),
                               lpips_jax.distance(params, x, b), atol=1e-6, rtol=1e-6)
  spatial = lpips_jax.distance_from_features(params, lpips_jax.features(params, a), target, spatial_size=(40, 40))
  np.testing.assert_allclose(spatial, lpips_jax.distance(params, a, b, spatial=True), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_rematerialised_trunk_gives_the_same_values_and_gradient(net):
  a, b = pairs(2, size=64)
  params = params_of(net)
  grad = lambda remat: jax.jit(jax.grad(lambda x, b, p: lpips_jax.distance(p, x, b, remat=remat).sum()))(a, b, params)
  np.testing.assert_allclose(grad(True), grad(False), atol=1e-9, rtol=1e-5)
  for options in ({}, {"spatial": True}, {"per_layer": True}):
    plain, remat = (lpips_jax.distance(params, a, b, remat=r, **options) for r in (False, True))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-7, rtol=1e-6), plain, remat)


def test_a_step_holds_at_most_the_pairs_there_are_and_the_pixel_budget(monkeypatch):
  from lpips_jax import scoring

  seen = []
  real = scoring._padded

  def recording(items, size):
    for tag, arrays, n, is_real in real(items, size):
      seen.append(arrays[0].shape)
      yield tag, arrays, n, is_real

  monkeypatch.setattr(scoring, "_padded", recording)
  a, b = pairs(10, size=32)
  d = score_pairs(params_of("alex"), a, b, batch_size=60_000)  # was padded to 60,000 pairs (6.4 GB, a minute)
  assert [s[0] for s in seen] == [16]  # 10 pairs, rounded up to the 8 devices
  np.testing.assert_allclose(d, lpips_jax.distance(params_of("alex"), a, b), rtol=1e-5, atol=1e-6)
  seen.clear()
  budget = 2 * (2 * 32 * 32)  # two pairs' pixels: a step of 2 pairs, rounded up to the 8 devices
  d = score_pairs(params_of("alex"), a, b, batch_size=60_000, batch_pixels=budget)
  assert [s[0] for s in seen] == [8, 8]
  np.testing.assert_allclose(d, lpips_jax.distance(params_of("alex"), a, b), rtol=1e-5, atol=1e-6)
  assert scoring.BATCH_PIXELS == {net: scoring.BATCH_BYTES // b for net, b in scoring.BYTES_PER_PIXEL.items()}
