"""Parity with the official lpips==0.1.4, run in this process on the same weights and inputs (float32, CPU)."""
import copy
import functools

import jax
import numpy as np
import pytest
import torch

import lpips_jax
from lpips_jax.convert.convert import from_lpips_state_dict, to_lpips_state_dict

NETS = ("alex", "vgg", "squeeze")
VERSIONS = ("0.0", "0.1")
OPTIONS = ("default", "spatial", "per_layer", "baseline", "normalize")
SIZES = ((64, 64), (65, 97), (100, 128))
GRAD_SIZE = (65, 97)
# The examples' distances with the pretrained trunks and v0.1 heads (docs/offline.md §3; #120 reports 0.722, 0.138
# for alex): an extra check beside the official package's own numbers.
GOLDEN = {"alex": (0.721881, 0.137566), "vgg": (0.568613, 0.421664), "squeeze": (0.711048, 0.147902)}


@functools.cache
def random_trunk_pair(make_official, net, version, lpips):
  """(official model with a torchvision-random trunk and the packaged heads, our params converted from it)."""
  model = make_official(net, version, lpips, seed=len(net) + 10 * lpips)
  return model, from_lpips_state_dict(model.state_dict(), net, version)


def pair_images(shape, seed):
  """a: smooth random image, b: a distorted by noise; both in [-1, 1]."""
  rng = np.random.default_rng(seed)
  n, h, w = shape
  coarse = rng.uniform(-1, 1, (n, h // 8 + 2, w // 8 + 2, 3))
  a = np.asarray(jax.image.resize(coarse, (n, h, w, 3), "cubic")).clip(-1, 1) * 0.9
  a = (a + rng.uniform(-0.1, 0.1, a.shape)).clip(-1, 1).astype(np.float32)
  b = (a + rng.normal(0, 0.3, a.shape)).clip(-1, 1).astype(np.float32)
  return a, b


def nchw(x, requires_grad=False):
  return torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=requires_grad)


def official_distance(model, a, b, *, spatial, per_layer, normalize):
  model.spatial = spatial  # the official module reads this attribute in forward
  out = model(nchw(a), nchw(b), retPerLayer=per_layer, normalize=normalize)
  squeeze = lambda t: t.detach().numpy()[:, 0] if spatial else t.detach().numpy().reshape(-1)
  if per_layer:
    return squeeze(out[0]), [squeeze(t) for t in out[1]]
  return squeeze(out)


def largest_error(ours, ref):
  """Absolute error, relative where the reference exceeds 1."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  return float(np.max(np.abs(ours - ref) / np.maximum(1.0, np.abs(ref))))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("net", NETS)
def test_forward_matches_official_on_random_trunks(net, version, option, size, make_official):
  model, params = random_trunk_pair(make_official, net, version, option != "baseline")
  normalize = option == "normalize"
  a, b = pair_images((2, *size), seed=sum(size))
  if normalize:
    a, b = (a + 1) / 2, (b + 1) / 2
  kwargs = dict(spatial=option == "spatial", per_layer=option == "per_layer", normalize=normalize)
  ref = official_distance(model, a, b, **kwargs)
  ours = lpips_jax.distance(params, a, b, **kwargs)
  if option == "per_layer":
    assert len(ours[1]) == len(ref[1]) == len(params) - 1 - (version == "0.1")
    for term, ref_term in zip(ours[1], ref[1]):
      assert largest_error(term, ref_term) <= 1e-5
    ours, ref = ours[0], ref[0]
  assert ours.dtype == np.float32
  assert largest_error(ours, ref) <= 1e-5
  assert np.all(ref > 0)  # the images differ: a comparison of zeros would prove nothing


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("net", NETS)
def test_input_gradients_match_torch_autograd(net, version, option, make_official):
  """d(sum of distances)/d(a, b) equals torch autograd's, both in float64.

  In float32 the trunk's gradient is discontinuous at ReLU and max-pool kinks: a one-ulp change of the input can
  switch a branch deep in VGG (measured: 4.7e-4 of the largest entry between torch float32 and JAX float32 on an
  otherwise matching input), so two float32 implementations agree only up to those flips. Float64 compares the
  derivative itself.
  """
  model, params = random_trunk_pair(make_official, net, version, option != "baseline")
  model = copy.deepcopy(model).double()
  normalize, spatial, per_layer = option == "normalize", option == "spatial", option == "per_layer"
  a, b = pair_images((2, *GRAD_SIZE), seed=7)
  if normalize:
    a, b = (a + 1) / 2, (b + 1) / 2
  a, b = a.astype(np.float64), b.astype(np.float64)
  model.spatial = spatial
  ta, tb = nchw(a, True), nchw(b, True)
  out = model(ta, tb, retPerLayer=per_layer, normalize=normalize)
  (out[1][-1] if per_layer else out).sum().backward()

  def loss(a, b, params):
    d = lpips_jax.distance(params, a, b, spatial=spatial, per_layer=per_layer, normalize=normalize)
    return (d[1][-1] if per_layer else d).sum()

  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda w: np.asarray(w, np.float64), params)
    ga, gb = jax.grad(loss, argnums=(0, 1))(a, b, params64)
  for ours, ref in ((ga, ta.grad), (gb, tb.grad)):
    ref = ref.numpy().transpose(0, 2, 3, 1)
    assert ours.dtype == np.float64 and np.abs(ref).max() > 0
    assert np.max(np.abs(np.asarray(ours) - ref)) <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("net", NETS)
def test_pretrained_trunks_give_the_published_example_distances(net, examples, make_official):
  params = lpips_jax.load(net)
  model = make_official(net)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in to_lpips_state_dict(params).items()}, strict=True)
  ref = np.concatenate([examples["ex_ref"]] * 2)
  other = np.concatenate([examples["ex_p0"], examples["ex_p1"]])
  ours = np.asarray(lpips_jax.distance(params, ref, other))
  official = official_distance(model, ref, other, spatial=False, per_layer=False, normalize=False)
  assert largest_error(ours, official) <= 1e-5
  assert largest_error(ours, GOLDEN[net]) <= 1e-5
  assert largest_error(official, GOLDEN[net]) <= 1e-5


@pytest.mark.parametrize("net", NETS)
def test_packaged_heads_equal_the_official_files(net, make_official):
  for version in VERSIONS:
    official = make_official(net, version).state_dict()  # pretrained heads loaded by the official loader
    ours = to_lpips_state_dict(lpips_jax.load(net, version))
    for k in range(len(lpips_jax.backbones.NETS[net].channels)):
      key = f"lin{k}.model.1.weight"
      np.testing.assert_array_equal(ours[key], official[key].numpy())
