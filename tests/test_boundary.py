"""The one boundary check of every public entry point: each bad input gives one line naming the problem and the fix
(or the correct result), never a traceback from inside the computation or a silently wrong number (issue 13)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lpips_jax
from lpips_jax import checks
from lpips_jax.errors import InputError
from lpips_jax.metrics import LPIPSMetric as Accumulator
from lpips_jax.metrics import NNXLPIPSMetric

SIZE = 32  # alex needs 31 pixels


@functools.cache
def alex():
  return lpips_jax.load("alex")


@functools.cache
def squeeze():
  return lpips_jax.load("squeeze")


def images(n=2, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)
  return a, np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)


def with_value(x, value, at=(0, 3, 4, 1)):
  x = np.array(x)
  x[at] = value
  return x


def changed(params, key, value):
  """A copy of `params` whose array at 'a/b/c' is `value(old array)`."""
  flat = {k: np.array(v) for k, v in lpips_jax.weights.flatten(params).items()}
  flat[key] = value(flat[key])
  return lpips_jax.weights.unflatten(flat)


def alex_features(x):
  return lpips_jax.features(alex(), x)


A, B = images()
F = alex_features(A)
MODEL = lpips_jax.NNXLPIPS("alex")
STATE = nnx.state(MODEL)

# (name, call, the message it must raise): one line each, naming the argument, the problem and the fix.
BAD = [
    # images, as every entry point checks them
    ("distance-rank-3", lambda: lpips_jax.distance(alex(), A[0], B[0]), r"a has shape \(32, 32, 3\).*add a batch axis"),
    ("distance-channels-first", lambda: lpips_jax.distance(alex(), A.transpose(0, 3, 1, 2), B),
     r"a has shape \(2, 3, 32, 32\), which looks channels-first .*x.transpose\(0, 2, 3, 1\)"),
    ("distance-grayscale", lambda: lpips_jax.distance(alex(), A[..., :1], B[..., :1]),
     r"a has 1 channels \(shape \(2, 32, 32, 1\)\); LPIPS takes RGB images .*jnp.repeat\(x, 3, axis=-1\)"),
    ("distance-four-channels", lambda: lpips_jax.distance(alex(), np.concatenate([A, A[..., :1]], -1), B),
     r"a has 4 channels \(shape \(2, 32, 32, 4\)\); LPIPS takes RGB images \[N, H, W, 3\]$"),
    ("distance-uint8", lambda: lpips_jax.distance(alex(), (A * 127.5 + 127.5).astype(np.uint8), B),
     r"a has dtype uint8; expected floating-point .*x.astype\(np.float32\) / 127.5 - 1"),
    ("distance-bool", lambda: lpips_jax.distance(alex(), A > 0, B), "a has dtype bool"),
    ("distance-complex", lambda: lpips_jax.distance(alex(), A.astype(np.complex64), B), "a has dtype complex64"),
    ("distance-nan", lambda: lpips_jax.distance(alex(), A, with_value(B, np.nan)),
     r"b has 1 NaN value \(of 6144\); LPIPS is undefined there"),
    ("distance-inf", lambda: lpips_jax.distance(alex(), with_value(with_value(A, np.inf), -np.inf, (1, 0, 0, 0)), B),
     r"a has 2 infinite values \(of 6144\)"),
    ("distance-nan-and-inf-on-device", lambda: lpips_jax.distance(
        alex(), jnp.asarray(with_value(with_value(A, np.nan), np.inf, (1, 0, 0, 0))), B),
     r"a has 1 NaN and 1 infinite values \(of 6144\)"),
    ("distance-0-255", lambda: lpips_jax.distance(alex(), A * 127.5 + 127.5, B),
     r"a has values in \[.*\], outside the expected \[-1, 1\]: use normalize=True .* x / 127.5 - 1"),
    ("distance-shapes-differ", lambda: lpips_jax.distance(alex(), A, B[:1]), "a and b must have the same shape"),
    ("distance-widths-differ", lambda: lpips_jax.distance(alex(), A, np.pad(B, ((0, 0), (0, 0), (0, 1), (0, 0)))),
     r"a and b must have the same shape; got \(2, 32, 32, 3\) and \(2, 32, 33, 3\) \(resize one first\)"),
    ("distance-8x8", lambda: lpips_jax.distance(alex(), A[:, :8, :8], B[:, :8, :8]),
     "a: images of 8x8 are too small for net 'alex': it needs at least 31x31"),
    ("features-channels-first", lambda: lpips_jax.features(alex(), A.transpose(0, 3, 1, 2)),
     "x has shape .* channels-first"),
    ("features-8x8", lambda: lpips_jax.features(alex(), A[:, :8, :8]), "x: images of 8x8 are too small"),
    ("features-0-255", lambda: lpips_jax.features(alex(), A * 127.5 + 127.5), r"x has values in \[.*\], outside"),
    ("features-uint8", lambda: lpips_jax.features(alex(), A.astype(np.uint8)), "x has dtype uint8"),
    ("features-nan", lambda: lpips_jax.features(alex(), with_value(A, np.nan)), "x has 1 NaN value"),
    ("features-rank-3", lambda: lpips_jax.features(alex(), A[0]), "x has shape .* add a batch axis"),
    ("features-normalize", lambda: lpips_jax.features(alex(), A, normalize=True), "without normalize=True"),
    # features
    ("from-features-3-of-5-layers", lambda: lpips_jax.distance_from_features(alex(), F[:3], F[:3]),
     r"f0 has taps of shapes .*; params of net 'alex' need 5 taps \[N, h, w, C\] with C = \[64, 192, 384, 256, "
     r"256\]: compute them with lpips_jax.features"),
    ("from-features-of-another-net", lambda: lpips_jax.distance_from_features(squeeze(), F, F),
     "params of net 'squeeze' need 7 taps .*these are features of net 'alex'"),
    ("from-features-shapes-differ", lambda: lpips_jax.distance_from_features(alex(), F, alex_features(A[:1])),
     r"f0\[0\] and f1\[0\] have shapes \(2, 7, 7, 64\) and \(1, 7, 7, 64\)"),
    ("from-features-int", lambda: lpips_jax.distance_from_features(alex(), F, tuple(t.astype(jnp.int32) for t in F)),
     r"f1\[0\] has dtype int32; features are floating point"),
    ("from-features-array", lambda: lpips_jax.distance_from_features(alex(), F[0], F[0]),
     "f0 is of type ArrayImpl; expected the tuple of taps"),
    ("from-features-mixed-batches", lambda: lpips_jax.distance_from_features(alex(), (F[0][:1], *F[1:]), F),
     r"f0's taps hold different batch sizes \[1, 2, 2, 2, 2\]"),
    ("from-features-nan", lambda: lpips_jax.distance_from_features(alex(), F, (F[0] * np.nan, *F[1:])),
     r"f1\[0\] has 6272 NaN values"),
    ("from-features-spatial-size", lambda: lpips_jax.distance_from_features(alex(), F, F, spatial_size=(32,)),
     r"spatial_size must be \(H, W\), two positive integers"),
    # score_pairs
    ("score-4-and-6", lambda: lpips_jax.score_pairs(alex(), images(4)[0], images(6)[1]),
     "a holds 4 images and b 6; score_pairs compares a\\[i\\] with b\\[i\\]"),
    ("score-batch-size-0", lambda: lpips_jax.score_pairs(alex(), A, B, batch_size=0),
     r"batch_size \(pairs per step\) must be a positive integer; got 0"),
    ("score-batch-size-negative", lambda: lpips_jax.score_pairs(alex(), A, B, batch_size=-1), "got -1"),
    ("score-batch-size-float", lambda: lpips_jax.score_pairs(alex(), A, B, batch_size=2.5), "got 2.5"),
    ("score-batch-size-bool", lambda: lpips_jax.score_pairs(alex(), A, B, batch_size=True), "got True"),
    ("score-b-missing", lambda: lpips_jax.score_pairs(alex(), A), "b is missing: score_pairs\\(params, a, b\\)"),
    ("score-items-not-pairs", lambda: lpips_jax.score_pairs(alex(), [(A, B, A)]),
     "each item of score_pairs' batches must be a pair \\(a_batch, b_batch\\); got a tuple of length 3"),
    ("score-nan-in-a-batch", lambda: lpips_jax.score_pairs(alex(), [(A, B), (A, with_value(B, np.nan))]),
     "b has 1 NaN value"),
    ("score-0-255", lambda: lpips_jax.score_pairs(alex(), A * 127.5 + 127.5, B), "a has values in"),
    ("score-mesh", lambda: lpips_jax.score_pairs(alex(), A, B, mesh=jax.make_mesh((2, 4), ("a", "b"))),
     "mesh must be 1-D with axis 'data'"),
    ("score-mesh-string", lambda: lpips_jax.score_pairs(alex(), A, B, mesh="data"),
     r"mesh must be a jax.sharding.Mesh with one axis 'data' \(e.g. jax.make_mesh\(\(n,\), \('data',\)\)\); got a str"),
    ("score-mesh-devices", lambda: lpips_jax.score_pairs(alex(), A, B, mesh=jax.devices()),
     "mesh must be a jax.sharding.Mesh .*; got a list"),
    ("score-batch-pixels", lambda: lpips_jax.score_pairs(alex(), A, B, batch_pixels=0),
     "batch_pixels must be a positive integer; got 0"),
    # params
    ("params-none", lambda: lpips_jax.distance(None, A, B),
     r"params is None; pass the float32 params of lpips_jax.load\(net, version\)"),
    ("params-list", lambda: lpips_jax.features([alex()], A), "params is a list, not a dict of arrays"),
    ("params-int32", lambda: lpips_jax.distance(jax.tree.map(lambda w: w.astype(np.int32), alex()), A, B),
     "params alex/features_0/bias has dtype int32; LPIPS weights are real floating-point arrays"),
    ("params-bool", lambda: lpips_jax.distance(changed(alex(), "lin3/kernel", lambda w: w > 0), A, B),
     "params lin3/kernel has dtype bool"),
    ("params-complex", lambda: lpips_jax.score_pairs(changed(alex(), "lin0/kernel", lambda w: w * (1 + 1j)), A, B),
     "params lin0/kernel has dtype complex"),
    ("params-nan", lambda: lpips_jax.distance(changed(alex(), "lin1/kernel", lambda w: w * np.nan), A, B),
     r"params lin1/kernel has 192 NaN values \(of 192\): the weights are damaged"),
    ("params-inf-on-device", lambda: lpips_jax.pairwise(jax.tree.map(jnp.asarray, changed(
        alex(), "alex/features_10/bias", lambda w: with_value(w, np.inf, 7))), A),
     r"params alex/features_10/bias has 1 infinite value \(of 256\)"),
    ("params-nnx-state", lambda: lpips_jax.distance(STATE, A, B),
     r"params is an nnx.State .*; pass plain arrays: nnx.to_pure_dict\(state\)\['weights'\]"),
    ("params-nnx-variables", lambda: lpips_jax.distance(MODEL.weights, A, B),
     r"params hold NNX variables, not arrays; pass plain arrays: nnx.to_pure_dict\(nnx.State\(params\)\)"),
    ("params-linen-variables", lambda: lpips_jax.distance(lpips_jax.LPIPS("alex").init(jax.random.key(0), A, B), A, B),
     r"params look like a linen variables dict \(top-level keys \['lpips'\]\); pass the LPIPS weights inside it: "
     r"variables\['lpips'\]\['weights'\]"),
    ("params-no-trunk", lambda: lpips_jax.distance({"lin0": {}}, A, B), "exactly one trunk"),
    # pairwise, diversity
    ("pairwise-int-params", lambda: lpips_jax.pairwise(jax.tree.map(lambda w: w.astype(np.int32), alex()), A),
     "params alex/features_0/bias has dtype int32"),
    ("pairwise-nan", lambda: lpips_jax.pairwise(alex(), A, with_value(B, np.nan)), "y has 1 NaN value"),
    ("pairwise-batch-size-bool", lambda: lpips_jax.pairwise(alex(), A, batch_size=True),
     "batch_size must be a positive integer; got True"),
    ("pairwise-cache-bytes", lambda: lpips_jax.pairwise(alex(), A, cache_bytes=-1),
     "cache_bytes must be a non-negative integer"),
    ("pairwise-mesh-string", lambda: lpips_jax.pairwise(alex(), A, mesh="data"),
     "mesh must be a jax.sharding.Mesh with one axis 'data'"),
    ("diversity-mesh-devices", lambda: lpips_jax.diversity(alex(), np.stack([A, B], 1), mesh=jax.devices()),
     "mesh must be a jax.sharding.Mesh .*; got a list"),
    ("diversity-inf", lambda: lpips_jax.diversity(alex(), np.stack([A, with_value(B, np.inf)], 1)),
     "samples has 1 infinite value"),
    # metrics and modules
    ("metric-nan-counted", lambda: Accumulator.from_model_output(with_value(A, np.nan), B, params=alex()),
     "predictions has 1 NaN value"),
    ("metric-shapes", lambda: Accumulator.from_model_output(A, B[:1], params=alex()),
     "predictions and targets must have the same shape"),
    ("metric-string-mask", lambda: Accumulator.from_model_output(A, B, params=alex(), mask="all"),
     r"mask must be booleans or 0/1 numbers, one per pair \(True or 1: counted\); got str of dtype <U3"),
    ("metric-mask-of-strings", lambda: Accumulator.from_distances(np.zeros(2), ["yes", "no"]),
     "mask must be booleans or 0/1 numbers, one per pair .*; got list of dtype <U3"),
    ("nnx-metric-mask-length", lambda: NNXLPIPSMetric().update(predictions=A, targets=B, params=alex(),
                                                               mask=np.ones(3, bool)),
     r"mask must have shape \(2,\), one entry per pair; got \(3,\)"),
    ("metric-nnx-uint8", lambda: NNXLPIPSMetric().update(predictions=A.astype(np.uint8), targets=B, params=alex()),
     "predictions has dtype uint8"),
    ("linen-module-nan", lambda: lpips_jax.LPIPS("alex").init(jax.random.key(0), A, with_value(B, np.nan)),
     "b has 1 NaN value"),
    ("nnx-module-channels-first", lambda: lpips_jax.NNXLPIPS("alex")(A.transpose(0, 3, 1, 2), B),
     "a has shape .* channels-first"),
    ("module-unknown-net", lambda: lpips_jax.NNXLPIPS("resnet"), "unknown net 'resnet'; choose one of"),
    # weights
    ("load-a-list", lambda: lpips_jax.load(["alex"]), r"net must be a net name \('alex', 'vgg', 'squeeze', "
     r"'alex_st', 'vgg_st', 'vgg_ensemble'\) or the path of a .safetensors weights file; got a list \(\['alex'\]\): "
     r"load one net at a time"),
    ("load-version-list", lambda: lpips_jax.load("alex", ["0.1"]), r"unknown version \['0.1'\]; choose the string"),
]


@pytest.mark.parametrize("call,message", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_is_one_line_naming_the_problem_and_the_fix(call, message):
  with pytest.raises(InputError, match=message) as error:  # a ValueError: the commands print it as one line
    call()
  assert "\n" not in str(error.value)


def test_an_option_diversity_does_not_pass_on_is_named():
  with pytest.raises(TypeError, match=r"diversity\(\) got unexpected options \['spatial'\]; it passes normalize, "):
    lpips_jax.diversity(alex(), np.stack([A, B], 1), spatial=True)


def test_the_suggested_replacements_give_the_distance():
  want = np.asarray(lpips_jax.distance(alex(), A, B))
  # The messages above name these expressions: each is the params the user meant.
  variables = lpips_jax.LPIPS("alex").init(jax.random.key(0), A, B)
  for params in (nnx.to_pure_dict(STATE)["weights"], nnx.to_pure_dict(nnx.State(MODEL.weights)),
                 variables["lpips"]["weights"]):
    np.testing.assert_array_equal(lpips_jax.distance(params, A, B), want)


# -- correct results at the edges ---------------------------------------------------------------------------------

def test_an_empty_batch_gives_an_empty_result_everywhere():
  empty = A[:0]
  d = lpips_jax.distance(alex(), empty, empty)
  assert d.shape == (0,) and d.dtype == jnp.float32
  assert lpips_jax.distance(alex(), empty, empty, spatial=True).shape == (0, SIZE, SIZE)
  total, terms = lpips_jax.distance(alex(), empty, empty, per_layer=True)
  assert total.shape == (0,) and [t.shape for t in terms] == [(0,)] * 5
  taps = lpips_jax.features(alex(), empty)
  assert [t.shape for t in taps] == [(0, *t.shape[1:]) for t in F]
  assert lpips_jax.distance_from_features(alex(), taps, taps).shape == (0,)
  for scored in (lpips_jax.score_pairs(alex(), empty, empty), lpips_jax.score_pairs(alex(), iter([]))):
    assert scored.shape == (0,) and scored.dtype == np.float32
  assert lpips_jax.pairwise(alex(), empty).shape == (0, 0)
  assert lpips_jax.diversity(alex(), np.zeros((0, 2, SIZE, SIZE, 3), np.float32)).shape == (0,)
  metric = Accumulator.from_model_output(empty, empty, params=alex())
  assert metric.count == 0 and np.isnan(metric.compute())
  assert lpips_jax.NNXLPIPS("alex")(empty, empty).shape == (0,)


def test_float64_float16_and_bfloat16_images_give_the_float32_distance():
  want = np.asarray(lpips_jax.distance(alex(), A, B))
  # float64 without jax_enable_x64 is computed in float32: the same values.
  np.testing.assert_array_equal(lpips_jax.distance(alex(), A.astype(np.float64), B.astype(np.float64)), want)
  with jax.enable_x64(True):
    wide = lpips_jax.distance(jax.tree.map(lambda w: w.astype(np.float64), alex()), A.astype(np.float64),
                              B.astype(np.float64))
    assert wide.dtype == jnp.float64
  np.testing.assert_allclose(wide, want, rtol=1e-5)
  for dtype in (jnp.float16, jnp.bfloat16):  # read as float32 from the rounded values
    a, b = (jnp.asarray(x, dtype) for x in (A, B))
    np.testing.assert_allclose(lpips_jax.distance(alex(), a, b),
                               lpips_jax.distance(alex(), np.asarray(a, np.float32), np.asarray(b, np.float32)),
                               rtol=1e-6)


def test_padding_the_mask_leaves_out_is_not_value_checked():
  # Eager evaluation with NaN padding: the counted pairs are checked, the masked ones may hold anything.
  padded = np.concatenate([A, np.full_like(A, np.nan)]), np.concatenate([B, B])
  metric = Accumulator.from_model_output(*padded, params=alex(), mask=np.array([1, 1, 0, 0]))
  np.testing.assert_allclose(metric.compute(), np.mean(np.asarray(lpips_jax.distance(alex(), A, B))), rtol=1e-6)
  with pytest.raises(ValueError, match=r"predictions has 3072 NaN values \(of 9216\)"):  # the third pair's
    Accumulator.from_model_output(*padded, params=alex(), mask=np.array([1, 1, 1, 0]))


def test_under_jit_values_are_unknown_and_nan_propagates_as_documented():
  nan_params = changed(alex(), "lin1/kernel", lambda w: with_value(w, np.nan, (0, 0, 5, 0)))
  step = jax.jit(lpips_jax.distance)
  assert np.isnan(step(nan_params, A, B)).all()  # params traced: not checked, NaN in every distance
  d = step(alex(), with_value(A, np.nan), B)
  assert np.isnan(d[0]) and np.isfinite(d[1])  # images traced: NaN in the pair that holds the NaN pixel
  with pytest.raises(ValueError, match="lin1/kernel has 1 NaN value"):  # closed over: concrete, checked once
    jax.jit(lambda a: lpips_jax.distance(nan_params, a, B))(A)


def test_traced_arrays_cost_no_value_check(monkeypatch):
  # A jitted training step traces its params and images: the boundary looks at shapes and dtypes only.
  seen = []
  monkeypatch.setattr(checks, "_extrema", lambda arrays: seen.append(len(arrays)) or [])

  @jax.jit
  def step(params, a, b):
    loss = lambda x: lpips_jax.distance_from_features(params, lpips_jax.features(params, x), lpips_jax.features(
        params, b)).sum()
    return jax.grad(loss)(a), lpips_jax.distance(params, a, b)

  step.lower(alex(), A, B)
  assert not seen  # no reduction at all
