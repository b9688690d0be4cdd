"""`pairwise` and `diversity` equal `lpips_jax.distance` on every pair, for every variant, on 8 fake CPU devices."""
import functools

import jax
import numpy as np
import pytest

import lpips_jax
from lpips_jax import all_pairs as all_pairs_module
from lpips_jax.all_pairs import diversity, pairwise

# (net, version, lpips): every net with both weight versions and the uncalibrated baseline.
VARIANTS = [(net, version, lpips) for net in ("alex", "vgg", "squeeze")
            for version, lpips in (("0.1", True), ("0.0", True), ("0.1", False))]
# Odd sizes, and more images than the 8 devices (tiles of 8 + 3, or 8 + 1); vgg small to stay quick on 2 cores.
SIZE, COUNT = {"alex": (33, 47), "squeeze": (33, 47), "vgg": (17, 21)}, {"alex": 11, "squeeze": 11, "vgg": 9}


@functools.cache
def params_of(net, version="0.1", lpips=True):
  return lpips_jax.load(net, version, lpips=lpips)


def images(n, size=(33, 47), seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, *size, 3)).astype(np.float32)


def near(x, scale=1e-3, seed=1):
  """A near duplicate of each image: x plus Gaussian noise of std `scale`, clipped to [-1, 1]."""
  return np.clip(x + np.random.default_rng(seed).normal(0, scale, x.shape), -1, 1).astype(np.float32)


def all_pairs(params, x, y):
  """distance(x[i], y[j]) for every (i, j), [N, M], by one plain `lpips_jax.distance` call."""
  a, b = np.repeat(x, len(y), 0), np.tile(y, (len(x), 1, 1, 1))
  return np.asarray(lpips_jax.distance(params, a, b)).reshape(len(x), len(y))


def upper_and_all_pairs(params, x, y):
  """(distance(x[i], x[j]) for i < j, (i, j), and `all_pairs(params, x, y)`), by one `lpips_jax.distance` call."""
  i, j = np.triu_indices(len(x), 1)
  a, b = np.concatenate([x[i], np.repeat(x, len(y), 0)]), np.concatenate([x[j], np.tile(y, (len(x), 1, 1, 1))])
  d = np.asarray(lpips_jax.distance(params, a, b))
  return d[:len(i)], (i, j), d[len(i):].reshape(len(x), len(y))


def assert_close(got, want, tol=1e-5):
  """|got - want| <= tol, relative for values above 1."""
  assert got.shape == want.shape and got.dtype == np.float32
  err = np.abs(got - want) / np.maximum(np.abs(want), 1)
  assert err.max() <= tol, f"largest error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


def test_eight_devices_are_there():
  assert jax.device_count() == 8


@pytest.mark.parametrize("net,version,lpips", VARIANTS)
def test_pairwise_equals_distance_on_every_pair(net, version, lpips):
  params, n = params_of(net, version, lpips), COUNT[net]
  x = images(n, SIZE[net])
  x[3] = near(x[1])
  y = np.concatenate([near(x[:1]), x[2:3], images(1, SIZE[net], seed=2)])  # N != M, a near and an exact duplicate
  upper, (i, j), want = upper_and_all_pairs(params, x, y)
  d, e = pairwise(params, x, batch_size=5), pairwise(params, x, y, batch_size=5)
  assert d.shape == (n, n) and e.shape == (n, 3)
  assert (d == d.T).all() and (np.diag(d) == 0).all()  # exactly
  assert_close(d[i, j], upper)
  assert_close(e, want)
  # The near duplicates (d ~ 5e-7) are also right relative to their own size, as far as `distance` itself is: its
  # value for such a pair moves by up to ~2e-4 with the batch it is computed in (squeeze: 4.66899e-7 alone,
  # 4.66821e-7 among 12 pairs). The product form alone is off by ~1e-7 absolute here (see the next test).
  for got, ref in ((d[1, 3], upper[(i == 1) & (j == 3)][0]), (e[0, 0], want[0, 0])):
    assert abs(got - ref) <= 1e-3 * ref
  assert e[2, 1] == 0


def test_near_duplicates_are_recomputed_to_relative_precision(monkeypatch):
  params = params_of("alex")
  x = images(6)
  x = np.concatenate([x, near(x, 1e-3), near(x, 1e-4, seed=2)])  # distances down to ~3e-9
  want, (i, j), _ = upper_and_all_pairs(params, x, x[:0])
  error = lambda d: np.abs(d[i, j] - want) / want
  assert error(pairwise(params, x)).max() < 1e-3  # ~1e-5 at 1e-3 noise; below, the features' own rounding shows
  monkeypatch.setattr(all_pairs_module, "RECOMPUTE", 0.0)  # without the recomputation: cancellation
  assert error(pairwise(params, x)).max() > 1e-1


@pytest.mark.parametrize("batch_size,cache_bytes", [(3, 2**31), (3, 0), (100, 0)])
def test_tiles_and_streaming_give_the_same_matrix(batch_size, cache_bytes):
  params = params_of("squeeze")
  x, y = images(13, seed=3), images(10, seed=4)
  upper, (i, j), want = upper_and_all_pairs(params, x, y)
  d = pairwise(params, x, batch_size=batch_size, cache_bytes=cache_bytes)
  assert (d == d.T).all() and (np.diag(d) == 0).all()
  assert_close(d[i, j], upper)
  assert_close(pairwise(params, x, y, batch_size=batch_size, cache_bytes=cache_bytes), want)


def test_a_one_device_mesh_and_normalize():
  params = params_of("alex")
  x, y = images(5, seed=5), images(3, seed=6)
  one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  assert_close(pairwise(params, x, y, mesh=one), all_pairs(params, x, y))
  assert_close(pairwise(params, (x + 1) / 2, (y + 1) / 2, normalize=True), all_pairs(params, x, y))


def test_empty_sets():
  params = params_of("alex")
  x = images(3)
  assert pairwise(params, x[:0]).shape == (0, 0)
  assert pairwise(params, x, x[:0]).shape == (3, 0)
  assert pairwise(params, x[:1]).tolist() == [[0.0]]


def test_diversity_is_the_mean_distance_over_each_groups_pairs():
  params = params_of("alex")
  samples = images(12).reshape(3, 4, 33, 47, 3)
  samples[1, 1] = near(samples[1, 0])
  got = diversity(params, samples, batch_size=3)
  i, j = np.triu_indices(4, 1)
  want = [np.mean(np.asarray(lpips_jax.distance(params, group[i], group[j]))) for group in samples]
  assert got.shape == (3,) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(diversity(params, samples[:, :2]), [all_pairs(params, g[:1], g[1:2])[0, 0]
                                                                 for g in samples], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda p, x: pairwise(p, x[0]), "x has shape .* add a batch axis"),
    (lambda p, x: pairwise(p, x, x.transpose(0, 3, 1, 2)), "y has shape .* channels-first"),
    (lambda p, x: pairwise(p, x, x[:, :32]), "same size; got 33x47 and 32x47"),
    (lambda p, x: pairwise(p, (x * 127).astype(np.int8)), "x has dtype int8"),
    (lambda p, x: pairwise(p, x[:, :20, :20]), "x: images of 20x20 are too small"),
    (lambda p, x: pairwise(p, x * 3), "x has values in"),
    (lambda p, x: pairwise(p, x, normalize=True), "x has values in"),
    (lambda p, x: pairwise(p, x, batch_size=0), "batch_size must be a positive integer"),
    (lambda p, x: pairwise(p, x, mesh=jax.make_mesh((2, 4), ("a", "b"))), "axis 'data'"),
    (lambda p, x: pairwise({"resnet": {}}, x), "exactly one trunk"),
    (lambda p, x: diversity(p, x), r"samples has shape .* \(one group\? add an axis"),
    (lambda p, x: diversity(p, x[:, None]), "K >= 2"),
    (lambda p, x: diversity(p, np.stack([x, x], 1)[..., :1]), "samples has 1 channels"),
])
def test_bad_input_raises_a_clear_error(call, message):
  with pytest.raises(ValueError, match=message):
    call(params_of("alex"), images(2))
