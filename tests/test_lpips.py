"""Properties of `lpips_jax.distance` over every variant, finite derivatives, transforms, input checks, modules."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lpips_jax
from lpips_jax.backbones import NETS
from lpips_jax.convert.convert import to_lpips_state_dict
from lpips_jax.lpips import EPS, features, unit_normalize

OFFICIAL = ("alex", "vgg", "squeeze")  # the official package's nets (the ST-LPIPS ones have their own reference)
# Every net in both versions and modes; the ST-LPIPS nets in version 0.1, the one their heads were trained for
# (their version 0.0 is tested against their reference in tests/test_parity.py). E-LPIPS, random and of one form,
# has its own tests (tests/test_elpips.py).
VARIANTS = [(net, version, lpips) for net in NETS for version in ("0.0", "0.1") for lpips in (True, False)
            if (NETS[net].heads is None or version == "0.1") and not NETS[net].ensemble]
ids = lambda v: f"{v[0]}-v{v[1]}-{'lin' if v[2] else 'baseline'}"


@functools.cache
def params_of(net, version="0.1", lpips=True):
  return lpips_jax.load(net, version, lpips=lpips)


def images(n=2, size=(64, 64), seed=0):
  """A random pair batch; by default of the shape tests/test_parity.py compiles too (the cache shares programs)."""
  rng = np.random.default_rng(seed)
  a = rng.uniform(-1, 1, (n, *size, 3)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.4, a.shape), -1, 1).astype(np.float32)
  return a, b


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_properties_of_every_variant(variant):
  params = params_of(*variant)
  a, b = images()
  d = lpips_jax.distance(params, a, b)
  assert d.shape == (2,) and d.dtype == jnp.float32
  assert np.all(np.asarray(d) > 0)
  # Symmetric bitwise, and d(x, x) exactly 0, as the official's two calls of one module: the total, the map and
  # every layer's term.
  for kind in ({}, {"spatial": True}):
    np.testing.assert_array_equal(lpips_jax.distance(params, b, a, **kind), lpips_jax.distance(params, a, b, **kind))
    assert not np.asarray(lpips_jax.distance(params, a, a, **kind)).any()
  for t_ab, t_ba, t_aa in zip(*(lpips_jax.distance(params, x, y, per_layer=True)[1] for x, y in ((a, b), (b, a),
                                                                                                  (a, a)))):
    np.testing.assert_array_equal(t_ab, t_ba)
    assert not np.asarray(t_aa).any()
  spatial = lpips_jax.distance(params, a, b, spatial=True)
  assert spatial.shape == (2, 64, 64) and spatial.dtype == jnp.float32
  total, terms = lpips_jax.distance(params, a, b, per_layer=True)
  assert len(terms) == len(NETS[variant[0]].channels) and all(t.shape == (2,) for t in terms)
  np.testing.assert_allclose(sum(np.asarray(t, np.float64) for t in terms), total, rtol=1e-6)
  np.testing.assert_allclose(lpips_jax.distance(params, (a + 1) / 2, (b + 1) / 2, normalize=True), d, rtol=1e-5)
  grad = jax.jit(jax.grad(lambda a, b, params: lpips_jax.distance(params, a, b).sum()))(a, b, params)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_batch_elements_never_interact():
  params = params_of("squeeze")
  a, b = images(n=3)
  together = lpips_jax.distance(params, a, b)
  alone = [lpips_jax.distance(params, a[i:i + 1], b[i:i + 1])[0] for i in range(3)]
  np.testing.assert_allclose(together, alone, rtol=1e-6)


def test_jit_grad_and_vmap_compose_with_distance():
  params = params_of("alex")
  a, b = images()
  eager = lpips_jax.distance(params, a, b)
  np.testing.assert_allclose(jax.jit(lpips_jax.distance)(params, a, b), eager, rtol=1e-6)
  stacked_a, stacked_b = np.stack([a, b, a]), np.stack([b, a, b])  # an extra leading axis [3, N, H, W, 3]
  mapped = jax.vmap(lpips_jax.distance, in_axes=(None, 0, 0))(params, stacked_a, stacked_b)
  looped = np.stack([lpips_jax.distance(params, x, y) for x, y in zip(stacked_a, stacked_b)])
  np.testing.assert_allclose(mapped, looped, rtol=1e-6)
  loss = lambda a: lpips_jax.distance(params, a, b).sum()
  eager_grad = np.asarray(jax.grad(loss)(a))
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(a), eager_grad, rtol=0, atol=1e-5 * np.abs(eager_grad).max())
  # The params are an argument: gradients w.r.t. the heads exist (training uses them).
  head_grads = jax.grad(lambda p: lpips_jax.distance(p, a, b).sum())(params)
  assert np.abs(head_grads["lin0"]["kernel"]).max() > 0


# -- derivatives where feature vectors are all zero (docs/official.md §1.5) ----------------------------------------

def naive_normalize(f):
  """The official normalize_tensor, written plainly: its derivative is NaN at an all-zero vector."""
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS)


def test_normalisation_equals_the_official_formula_and_has_finite_derivatives_at_zero():
  f = np.random.default_rng(0).normal(size=(2, 5, 5, 8)).astype(np.float32)
  f[0, 1, 2] = 0  # an all-zero feature vector, as ReLU leaves them
  f[1, 3, :, :] = 0
  np.testing.assert_array_equal(unit_normalize(f), naive_normalize(f))  # forward: bit for bit
  zero = jnp.zeros((1, 1, 1, 4))
  tangent = jnp.ones_like(zero)
  assert np.isnan(jax.jvp(naive_normalize, (zero,), (tangent,))[1]).all()
  assert np.isnan(jax.grad(lambda f: naive_normalize(f).sum())(zero)).all()
  _, jvp = jax.jvp(unit_normalize, (zero,), (tangent,))
  np.testing.assert_allclose(jvp, tangent / EPS)  # the exact derivative of f / (||f|| + eps) at f = 0
  np.testing.assert_allclose(jax.grad(lambda f: unit_normalize(f).sum())(zero), np.full((1, 1, 1, 4), 1 / EPS))
  for derivative in (jax.jacfwd(unit_normalize), jax.jacrev(unit_normalize),
                     jax.hessian(lambda f: unit_normalize(f).sum())):
    assert np.all(np.isfinite(jax.jit(derivative)(zero)))  # jitted: one program, not one per operation
  assert np.all(np.isfinite(jax.jit(jax.jacfwd(unit_normalize))(f)))


def spec_zero_vector_pair():
  """docs/official.md §1.5: a constant image of colour (0.983, 0.872, 0.843), and that image plus clipped noise."""
  a = np.broadcast_to(np.array([0.983, 0.872, 0.843], np.float32), (1, 64, 64, 3)).copy()
  b = np.clip(a + np.random.default_rng(0).normal(0, 0.2, a.shape), -1, 1).astype(np.float32)
  return a, b


def constant(value, colour=(1, 1, 1)):
  return np.broadcast_to(np.float32(value) * np.array(colour, np.float32), (1, 64, 64, 3)).copy()


def dead_trunk(net):
  """Pretrained params whose last trunk conv has a bias of -1e3: every deepest feature vector is zero."""
  params = jax.tree.map(np.array, params_of(net))
  last = max(params[net], key=lambda name: int(name.split("_")[1]))
  layer = params[net][last]
  for conv in ([layer] if "bias" in layer else [layer["expand1x1"], layer["expand3x3"]]):
    conv["bias"] = conv["bias"] - 1e3
  return params


def zero_vector_cases():
  a, b = spec_zero_vector_pair()
  rng = np.random.default_rng(1)
  noisy = lambda x: np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  yield "spec-example-alex", "alex", params_of("alex"), a, b, True
  yield "constant-0.75-alex", "alex", params_of("alex"), constant(0.75), noisy(constant(0.75)), True
  for net in OFFICIAL:
    yield f"dead-relu-{net}", net, dead_trunk(net), *images(n=1, size=(64, 64), seed=3), True
    yield f"identical-{net}", net, params_of(net), a, a, False
    yield f"constant-zero-{net}", net, params_of(net), constant(0), constant(0.5, (1, -1, 0)), False
    yield f"saturated-{net}", net, params_of(net), constant(1), constant(-1), False
    yield f"saturated-noise-{net}", net, params_of(net), constant(1), np.sign(noisy(constant(0))), False


@pytest.mark.parametrize("case", list(zero_vector_cases()), ids=lambda c: c[0])
def test_derivatives_are_finite_where_the_official_formula_is_nan(case, make_official):
  name, net, params, a, b, has_zero_vector = case
  # Forward: the official package on the same weights gives the same values.
  model = make_official(net)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in to_lpips_state_dict(params).items()})
  ref = model(torch.tensor(a.transpose(0, 3, 1, 2)), torch.tensor(b.transpose(0, 3, 1, 2))).detach().numpy()
  d = lpips_jax.distance(params, a, b)
  np.testing.assert_allclose(d, ref.reshape(-1), atol=1e-5, rtol=1e-5)
  tangent = np.random.default_rng(2).normal(size=a.shape).astype(np.float32)

  @jax.jit  # the three derivatives in one program (the params an argument): a third of three eager ones' compile
  def derivatives(a, b, params, tangent):
    f = lambda a: lpips_jax.distance(params, a, b).sum()
    _, jvp = jax.jvp(f, (a,), (tangent,))
    _, hvp = jax.jvp(jax.grad(f), (a,), (tangent,))  # second order: forward over reverse
    return jax.grad(f)(a), jvp, hvp

  for value in derivatives(a, b, params, tangent):
    assert np.all(np.isfinite(value)), name
  if has_zero_vector and name == "spec-example-alex":
    # The same derivative through the official formula is NaN: the case tests what it claims to.
    naive = lambda a: jnp.sum(sum(jnp.mean(jnp.dot((naive_normalize(u) - naive_normalize(v)) ** 2,
                                                   params[f"lin{k}"]["kernel"][0, 0, :, 0]), axis=(1, 2))
                                  for k, (u, v) in enumerate(zip(raw_taps(params, a), raw_taps(params, b)))))
    assert np.isnan(jax.jvp(naive, (a,), (tangent,))[1])


def raw_taps(params, x):
  """The trunk's taps before normalisation (the pipeline's first stage)."""
  from lpips_jax.checks import check_params
  from lpips_jax.lpips import trunk_taps

  return trunk_taps(check_params(params), params, x, False, None, None, False)


def test_some_cases_really_have_all_zero_feature_vectors():
  found = {name: sum(int(jnp.sum(jnp.all(t == 0, axis=-1))) for t in features(params, a))
           for name, _, params, a, _, expected in zero_vector_cases() if expected}
  assert all(count > 0 for count in found.values()), found


# -- input checks (the table of bad inputs: tests/test_boundary.py) -------------------------------------------------

def test_normalize_flag_is_checked_against_the_range():
  a, b = images()
  with pytest.raises(ValueError, match="without normalize=True"):
    lpips_jax.distance(params_of("alex"), a, b, normalize=True)


@pytest.mark.parametrize("net", OFFICIAL)  # the ST-LPIPS nets': tests/test_parity.py
def test_minimum_image_size_is_the_smallest_the_official_trunk_accepts(net, make_official):
  least = NETS[net].min_size
  model = make_official(net)
  fits = np.zeros((1, least, least + 5, 3), np.float32)
  assert np.isfinite(lpips_jax.distance(params_of(net), fits, fits)).all()
  model(torch.zeros(1, 3, least, least + 5), torch.zeros(1, 3, least, least + 5))
  small = np.zeros((1, least - 1, 64, 3), np.float32)
  with pytest.raises(ValueError, match=f"at least {least}x{least}"):
    lpips_jax.distance(params_of(net), small, small)
  with pytest.raises(RuntimeError):
    model(torch.zeros(1, 3, least - 1, 64), torch.zeros(1, 3, least - 1, 64))


def test_params_of_the_wrong_shape_name_the_key():
  params = jax.tree.map(np.array, params_of("alex"))
  params["lin2"]["kernel"] = np.zeros((1, 1, 10, 1), np.float32)
  with pytest.raises(ValueError, match=r"lin2/kernel: shape \(1, 1, 10, 1\), expected \(1, 1, 384, 1\)"):
    lpips_jax.distance(params, *images())
  with pytest.raises(ValueError, match="exactly one trunk"):
    lpips_jax.distance({"lin0": {}}, *images())


@pytest.mark.parametrize("bad", ["resnet", "alex ", "VGG"])
def test_unknown_net_or_version_lists_the_choices(bad):
  with pytest.raises(ValueError, match="choose one of"):
    lpips_jax.load(bad)
  with pytest.raises(ValueError, match="choose the string '0.1'"):
    lpips_jax.load("alex", 0.1)


def test_official_aliases_load_the_same_weights():
  for alias, net in (("alexnet", "alex"), ("vgg16", "vgg"), ("squeezenet1_1", "squeeze")):
    assert set(lpips_jax.load(alias)) == set(params_of(net))


# -- modules ----------------------------------------------------------------------------------------------------

def test_linen_module_keeps_lpips_out_of_the_trainable_params():
  import flax.linen as nn

  class Generator(nn.Module):
    @nn.compact
    def __call__(self, x, target):
      return lpips_jax.LPIPS("squeeze")(jnp.tanh(nn.Dense(3)(x)), target).mean()

  a, b = images()
  variables = Generator().init(jax.random.key(0), a, b)
  assert set(variables) == {"params", "lpips"} and set(variables["params"]) == {"Dense_0"}
  grads = jax.grad(lambda p: Generator().apply({**variables, "params": p}, a, b))(variables["params"])
  assert np.abs(grads["Dense_0"]["kernel"]).max() > 0
  dense = variables["params"]["Dense_0"]
  mapped = jnp.tanh(a @ dense["kernel"] + dense["bias"].reshape(1, 1, 1, 3))
  expected = lpips_jax.distance(params_of("squeeze"), mapped, b).mean()
  np.testing.assert_allclose(jax.jit(Generator().apply)(variables, a, b), expected, rtol=1e-5)
  trainable = lpips_jax.LPIPS("squeeze", trainable=True).init(jax.random.key(0), a, b)
  assert set(trainable) == {"params"}


def test_nnx_module_weights_are_not_params_unless_asked():
  import optax
  from flax import nnx

  class Generator(nnx.Module):
    def __init__(self):
      self.dense = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
      self.lpips = lpips_jax.NNXLPIPS("squeeze")

    def __call__(self, x, target):
      return self.lpips(jnp.tanh(self.dense(x)), target).mean()

  a, b = images()
  model = Generator()
  assert {path[0] for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))} == {"dense"}
  weights_before = jax.tree.map(np.array, nnx.state(model.lpips))
  optimizer = nnx.Optimizer(model, optax.chain(optax.add_decayed_weights(0.1), optax.sgd(1e-2)), wrt=nnx.Param)
  loss, grads = nnx.value_and_grad(lambda m: m(a, b))(model)
  optimizer.update(model, grads)
  assert model(a, b) < loss
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, nnx.state(model.lpips)), weights_before)
  trainable = lpips_jax.NNXLPIPS("squeeze", trainable=True)
  assert len(jax.tree.leaves(nnx.state(trainable, nnx.Param))) == len(jax.tree.leaves(params_of("squeeze")))
