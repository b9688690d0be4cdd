"""Every entry point serves every variant of the family: the params decide it, and each entry point's result is the
distance's (whose properties tests/test_lpips.py checks over every variant, and whose parity with each reference
tests/test_parity.py checks)."""
import functools
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import lpips_jax
from lpips_jax.metrics import LPIPSMetric, NNXLPIPSMetric

ST_NETS = ("alex_st", "vgg_st")
SIZE = (32, 40)  # above both ST trunks' minimum sizes (21, 18), small enough to be quick


@functools.cache
def params_of(net: str, lpips: bool = True):
  return lpips_jax.load(net, lpips=lpips)


def images(n: int, seed: int):
  rng = np.random.default_rng(seed)
  a = rng.uniform(-1, 1, (n, *SIZE, 3)).astype(np.float32)
  return a, np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)


@pytest.mark.parametrize("net", ST_NETS)
def test_features_and_distance_from_features_give_the_distance(net):
  params = params_of(net)
  a, b = images(2, 1)
  fa, fb = lpips_jax.features(params, a), lpips_jax.features(params, b)
  assert len(fa) == len(lpips_jax.backbones.NETS[net].channels)
  np.testing.assert_allclose(lpips_jax.distance_from_features(params, fa, fb), lpips_jax.distance(params, a, b),
                             rtol=1e-5)
  np.testing.assert_allclose(lpips_jax.distance_from_features(params, fa, fb, spatial_size=SIZE),
                             lpips_jax.distance(params, a, b, spatial=True), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("net", ST_NETS)
def test_pairwise_diversity_and_score_pairs_give_the_distances(net):
  params = params_of(net)
  x, y = images(3, 2)
  matrix = lpips_jax.pairwise(params, x, y, batch_size=4)
  expected = np.array([[float(lpips_jax.distance(params, x[i:i + 1], y[j:j + 1])[0]) for j in range(3)]
                       for i in range(3)])
  np.testing.assert_allclose(matrix, expected, rtol=1e-4)  # batched convolutions round differently: ~3e-5
  within = lpips_jax.diversity(params, x[None])
  np.testing.assert_allclose(within, [np.mean([lpips_jax.distance(params, x[i:i + 1], x[j:j + 1])[0]
                                                for i in range(3) for j in range(i + 1, 3)])], rtol=1e-4)
  # Sharded over the 8 fake devices, the last batch padded.
  np.testing.assert_allclose(lpips_jax.score_pairs(params, x, y, batch_size=2), np.diag(expected), rtol=1e-4)


@pytest.mark.parametrize("net", ST_NETS)
def test_the_metrics_average_the_distances(net):
  params = params_of(net)
  a, b = images(3, 3)
  mask = np.array([True, False, True])
  d = np.asarray(lpips_jax.distance(params, a, b))
  metric = jax.jit(lambda p, a, b, m: LPIPSMetric.from_model_output(a, b, params=p, mask=m))(params, a, b, mask)
  np.testing.assert_allclose(metric.compute(), d[mask].mean(), rtol=1e-5)
  nnx_metric = NNXLPIPSMetric()
  nnx_metric.update(predictions=a, targets=b, params=params, mask=mask)
  np.testing.assert_allclose(nnx_metric.compute(), d[mask].mean(), rtol=1e-5)


@pytest.mark.parametrize("net", ST_NETS)
def test_the_linen_and_nnx_modules_compute_the_distance(net):
  a, b = images(2, 4)
  expected = lpips_jax.distance(params_of(net), a, b)
  module = lpips_jax.LPIPS(net)
  variables = module.init(jax.random.key(0), a, b)
  np.testing.assert_allclose(module.apply(variables, a, b), expected, rtol=1e-6)
  np.testing.assert_allclose(lpips_jax.NNXLPIPS(net)(a, b), expected, rtol=1e-6)
  assert isinstance(nnx.state(lpips_jax.NNXLPIPS(net)), nnx.State)


def test_the_command_names_the_variant_in_its_summary_line(tmp_path):
  from PIL import Image

  a, b = (tmp_path / "a", tmp_path / "b")
  for folder, images_ in ((a, images(2, 5)[0]), (b, images(2, 5)[1])):
    folder.mkdir()
    for k, x in enumerate(images_):
      Image.fromarray(np.round((x + 1) * 127.5).astype(np.uint8)).save(folder / f"{k}.png")
  done = subprocess.run([sys.executable, "-m", "lpips_jax", "--net", "alex_st", str(a), str(b)], capture_output=True,
                        text=True)
  assert done.returncode == 0, done.stderr
  assert done.stderr.splitlines()[-1].startswith("lpips-jax: alex_st v0.1: 2 pairs, mean ")
  rows = done.stdout.splitlines()[1:]
  assert len(rows) == 2
