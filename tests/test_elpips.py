"""E-LPIPS's deterministic core against the numbers of its reference (mkettune/elpips, TensorFlow), computed outside
this repository for fixed transformations, dropout off (tests/data/elpips_goldens_seeded.json: its `provenance`
says how; docs/variants.md §2 says what each step does)."""
import functools
import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import lpips_jax
from lpips_jax import elpips
from lpips_jax.layout import Variant

VARIANT = Variant("vgg_ensemble", True, True)
GOLDENS = json.loads((Path(__file__).parent / "data" / "elpips_goldens_seeded.json").read_text())
IMAGES = Path(lpips_jax.__file__).parent / "images"
# One batch of 8 pairs for most tests (8: the fake devices' count, so that score_pairs' one step is this batch):
# each E-LPIPS program compiles a network for every scale level, and tests that share shapes share programs.
RNG = np.random.default_rng(0)
A = RNG.uniform(-1, 1, (8, 64, 64, 3)).astype(np.float32)
B = np.clip(A + RNG.normal(0, 0.3, A.shape), -1, 1).astype(np.float32)


@functools.cache
def pairs() -> dict:
  """The goldens' image pairs (`pairs` in the JSON): (image, reference), each [1, H, W, 3] float64 in [0, 1]."""
  from skimage import data

  ex = {n: np.asarray(Image.open(IMAGES / f"{n}.png").convert("RGB"), np.float64) / 255 for n in
        ("ex_ref", "ex_p0", "ex_p1")}
  astronaut = data.astronaut()
  crop = astronaut[100:196, 150:230]
  out = {"ex_p0": (ex["ex_p0"], ex["ex_ref"]), "ex_p1": (ex["ex_p1"], ex["ex_ref"]),
         "ex_p0_crop64x48": (ex["ex_p0"][:, 8:56], ex["ex_ref"][:, 8:56]),
         "ex_p1_crop64x48": (ex["ex_p1"][:, 8:56], ex["ex_ref"][:, 8:56]),
         "astronaut_shift": (astronaut[103:199, 152:232] / 255, crop / 255),
         "astronaut_quant16": ((crop // 16 * 16 + 8) / 255, crop / 255)}
  return {name: tuple(x[None] for x in pair) for name, pair in out.items()}


def as_params(params, dtype=np.float32) -> dict:
  return jax.tree.map(lambda w: np.asarray(w, dtype), params)


def transform_of(entry: dict) -> elpips.Transform:
  return elpips.Transform(entry["scale"], tuple(entry["scale_pad"]), entry["offset"], entry["flip"],
                          entry["transpose"], entry["permutation"], entry["color_scale"])


# Every transformation (each scale level 1-8, offsets, flips, transposition, permutations, colour scales) on a
# 64x64 pair and a non-square photograph; the other pairs with fewer, for time.
EVERY = ("ex_p0", "astronaut_shift")
SOME = ("identity", "t02", "t03", "t07", "t11")


def cases():
  for pair, by_transform in GOLDENS["vgg"].items():
    for name, golden in by_transform.items():
      if golden["total"] is not None and (pair in EVERY or name in SOME):  # null: the reference failed or gave NaN
        yield pytest.param(pair, name, golden, id=f"{pair}-{name}")


def test_the_seeded_heads_are_the_goldens():
  heads = elpips.seeded_heads()
  assert [h.size for h in heads] == GOLDENS["heads"]["channels"] == list(elpips.CHANNELS)
  digest = hashlib.sha256(b"".join(h.astype("<f4").tobytes() for h in heads)).hexdigest()
  assert digest == GOLDENS["heads"]["sha256_of_concatenated_float32"]


# The transformation a traced argument, as in `elpips.pipeline`: one program per pair shape and canvas, not one
# eager run of every operation per case.
transformed_distance = jax.jit(elpips.transformed_distance, static_argnums=0, static_argnames=("small", "per_layer"))


@pytest.mark.parametrize("pair, name, golden", list(cases()))
def test_the_network_under_a_fixed_transformation_is_the_references(pair, name, golden, elpips_params):
  """Float64, as the goldens: the per-layer values and the total within 1e-5 (relative) of the reference's."""
  t = transform_of(next(t for t in GOLDENS["transforms"] if t["name"] == name))
  with jax.enable_x64(True):
    params = as_params(elpips_params, np.float64)
    total, layers = transformed_distance(VARIANT, params, t, *pairs()[pair], small=t.scale > 1, per_layer=True)
  np.testing.assert_allclose(np.asarray(layers)[:, 0], golden["layers"], rtol=1e-5, atol=1e-9)
  assert abs(float(total[0]) - golden["total"]) <= 1e-5 * abs(golden["total"])


def test_the_input_gradient_is_finite_and_the_distance_symmetric_and_zero_on_equal_images(elpips_params):
  key = jax.random.key(3)
  grad = jax.jit(jax.grad(lambda x, p, key: lpips_jax.distance(p, x, B, key=key).sum()))(A, elpips_params, key)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
  d = lpips_jax.distance(elpips_params, A, B, key=key)
  np.testing.assert_array_equal(lpips_jax.distance(elpips_params, B, A, key=key), d)
  assert not np.asarray(lpips_jax.distance(elpips_params, A, A, key=key)).any()


# The sampler (§2 C), without the network: many draws, each frequency within 5 binomial standard errors of its
# probability. A wrong probability, range or stratification fails; a correct sampler fails with p < 1e-5.
def draws(n_images: int, count: int) -> elpips.Transform:
  return jax.jit(jax.vmap(lambda k: elpips.sample(k, n_images)))(jax.random.split(jax.random.key(7), count))


def close_to(frequencies, probabilities, count):
  probabilities = np.asarray(probabilities, np.float64)
  return np.all(np.abs(np.asarray(frequencies) - probabilities) <= 5 * np.sqrt(probabilities * (1 - probabilities)
                                                                               / count) + 1e-12)


def test_the_scale_level_has_probability_proportional_to_one_over_its_square_and_its_padding_is_uniform():
  t, count = draws(1, 40000), 40000
  weights = 1 / np.arange(1, 9) ** 2
  assert close_to(np.bincount(t.scale, minlength=9)[1:] / count, weights / weights.sum(), count)
  assert np.all((0 <= t.scale_pad) & (t.scale_pad < t.scale[:, None]))
  for s in (2, 5):  # each padding value 1/s
    pad = np.asarray(t.scale_pad)[np.asarray(t.scale) == s]
    assert close_to(np.bincount(pad.ravel(), minlength=s) / pad.size, np.full(s, 1 / s), pad.size)
  assert close_to([np.mean(t.transpose)], [0.5], count)


def test_a_single_images_offsets_flips_permutations_and_colours_are_uniform():
  t, count = draws(1, 20000), 20000
  assert close_to(np.bincount(np.asarray(t.offset).ravel(), minlength=8) / (2 * count), np.full(8, 1 / 8), 2 * count)
  assert close_to(np.bincount(np.asarray(t.flip).ravel(), minlength=4) / count, np.full(4, 1 / 4), count)
  codes = [tuple(p) for p in np.asarray(t.permutation).reshape(-1, 3)]
  assert close_to([codes.count(tuple(p)) / count for p in elpips.PERMUTATIONS], np.full(6, 1 / 6), count)
  colour = np.asarray(t.color_scale)
  assert colour.min() >= 0.2 and colour.max() < 1
  assert close_to(np.histogram(colour, bins=8, range=(0.2, 1))[0] / colour.size, np.full(8, 1 / 8), colour.size)


@pytest.mark.parametrize("n", [4, 6, 8, 12])
def test_flips_permutations_and_colour_scales_are_stratified_across_a_batch(n):
  t = draws(n, 500)
  flips = np.apply_along_axis(np.bincount, 1, np.asarray(t.flip), minlength=4)
  assert np.all(flips == n // 4) if n % 4 == 0 else np.all(flips <= -(-n // 4))
  permutations = np.asarray(t.permutation) @ np.array([9, 3, 1])  # one number per permutation
  used = np.apply_along_axis(np.bincount, 1, permutations, minlength=22)[:, elpips.PERMUTATIONS @ [9, 3, 1]]
  assert np.all(used == n // 6) if n % 6 == 0 else np.all(used <= -(-n // 6))
  strata = np.floor((np.asarray(t.color_scale) - 0.2) / 0.8 * n).astype(int)  # [draws, n, 3]
  assert np.all(np.sort(strata, axis=1) == np.arange(n)[None, :, None])  # each stratum once per channel
  # ... in a random order: every image falls in every stratum sometimes
  assert all(len(np.unique(strata[:, i, 0])) == n for i in range(n))


def test_the_mean_over_random_samples_is_the_references(elpips_params):
  """The reference's mean over 6,000 calls (TensorFlow, seeded heads, dropout on, 8 scale levels; the JSON's
  `random` field) against ours over 300 samples (`samples=300`, one call): within 3 standard errors of the
  difference. Ours is sigma / sqrt(300), sigma the reference's per-call standard deviation (the same under the
  hypothesis tested, that both draw from one distribution)."""
  reference = GOLDENS["random"]
  image, ref = (np.concatenate([pairs()[p][i] for p in ("ex_p0", "ex_p1")]).astype(np.float32) for i in (0, 1))
  mean = lpips_jax.distance(elpips_params, image, ref, key=jax.random.key(11), samples=300, normalize=True)
  for j, name in enumerate(("ex_p0", "ex_p1")):
    expected = reference["pairs"][name]
    sem = np.hypot(expected["std"] / np.sqrt(300), expected["sem"])
    assert abs(float(mean[j]) - expected["mean"]) <= 3 * sem, (name, float(mean[j]), expected)


def test_the_same_key_gives_the_same_value_and_another_key_another(elpips_params):
  d = lambda seed: np.asarray(lpips_jax.distance(elpips_params, A, B, key=jax.random.key(seed)))
  np.testing.assert_array_equal(d(5), d(5))
  assert np.all(d(5) != d(6))


# E-LPIPS through the other entry points: the params decide the variant; the key comes as each entry point says.


def test_features_of_one_key_give_that_samples_distance(elpips_params):
  key = jax.random.key(8)
  f0, f1 = (lpips_jax.features(elpips_params, x, key=key) for x in (A, B))
  assert len(f0) == 14 and f0[1].shape[-1] == 64
  np.testing.assert_allclose(lpips_jax.distance_from_features(elpips_params, f0, f1),
                             lpips_jax.distance(elpips_params, A, B, key=key), rtol=1e-5)
  with pytest.raises(ValueError, match=r"E-LPIPS features \(features, pairwise, diversity\) need a concrete key"):
    jax.jit(lambda k: lpips_jax.features(elpips_params, A, key=k))(key)


def test_the_metrics_and_modules_take_the_key_as_they_say(elpips_params, monkeypatch):
  from flax import nnx

  from lpips_jax import metrics, modules

  key = jax.random.key(9)
  d = np.asarray(lpips_jax.distance(elpips_params, A, B, key=key))
  np.testing.assert_allclose(metrics.LPIPSMetric.from_model_output(A, B, params=elpips_params, key=key).compute(),
                             d.mean(), rtol=1e-6)
  metric = metrics.NNXLPIPSMetric()
  metric.update(predictions=A, targets=B, params=elpips_params, key=key)
  np.testing.assert_allclose(metric.compute(), d.mean(), rtol=1e-6)

  monkeypatch.setattr(modules, "_pretrained", lambda net, version, lpips: elpips_params)  # the heads file is local
  linen = modules.LPIPS("vgg_ensemble")
  variables = linen.init({"params": key, "elpips": key}, A, B)
  one = linen.apply(variables, A, B, rngs={"elpips": key})
  np.testing.assert_array_equal(one, linen.apply(variables, A, B, rngs={"elpips": key}))
  np.testing.assert_allclose(linen.apply(variables, A, B, key=key), d, rtol=1e-6)
  with pytest.raises(ValueError, match=r"apply the model with rngs=\{'elpips': key\}"):
    linen.apply(variables, A, B)
  model = modules.NNXLPIPS("elpips", rngs=nnx.Rngs(elpips=0))
  first, second = model(A, B), model(A, B)  # each call draws the next key
  assert np.all(np.isfinite(first)) and not np.array_equal(first, second)
  np.testing.assert_allclose(model(A, B, key=key), d, rtol=1e-6)
  with pytest.raises(ValueError, match=r"build the module with rngs=nnx.Rngs\(elpips=seed\)"):
    modules.NNXLPIPS("vgg_ensemble")(A, B)


@pytest.mark.parametrize("call, message", [
    (lambda p: lpips_jax.distance(p, A, B), r"E-LPIPS averages the distance over random transformations of both "
     r"images: pass key=jax.random.key\(seed\)"),
    (lambda p: lpips_jax.distance(p, A, B, key=0), r"key must be one jax.random key .* got int"),
    (lambda p: lpips_jax.distance(p, A, B, key=jax.random.key(0), samples=0), "samples must be a positive integer"),
    (lambda p: lpips_jax.distance(p, A, B, key=jax.random.key(0), spatial=True), "E-LPIPS has no spatial map"),
    (lambda p: lpips_jax.distance(p, A[:, :57], B[:, :57], key=jax.random.key(0)),
     r"images of 57x64 are too small for net 'vgg_ensemble': it needs at least 58x58 \(E-LPIPS downscales by up to "
     r"8, after which its network needs 16 pixels"),
    (lambda p: lpips_jax.distance(lpips_jax.load("alex"), A, B, key=jax.random.key(0)),
     r"key and samples are E-LPIPS's .* net 'alex' is deterministic: leave them out"),
    (lambda p: lpips_jax.distance({k: v for k, v in p.items() if k != "scaling"}, A, B, key=jax.random.key(0)),
     r"params for net 'vgg_ensemble' \(E-LPIPS\) need the input scaling and all 14 heads; missing \['scaling'\]"),
    (lambda p: lpips_jax.score_pairs(p, A, B), r"pass key=jax.random.key\(seed\)"),
    (lambda p: lpips_jax.pairwise(p, A), r"pass key=jax.random.key\(seed\)"),
    (lambda p: jax.jit(lambda k: lpips_jax.pairwise(p, A, key=k))(jax.random.key(0)),
     r"E-LPIPS features \(features, pairwise, diversity\) need a concrete key"),
], ids=["no-key", "int-key", "no-samples", "spatial", "too-small", "key-for-lpips", "no-scaling", "score_pairs-no-key",
        "pairwise-no-key", "pairwise-traced-key"])
def test_bad_elpips_calls_say_what_to_do(elpips_params, call, message):
  with pytest.raises(ValueError, match=message):
    call(elpips_params)


def test_score_pairs_gives_each_step_the_samples_of_its_first_pairs_index(elpips_params):
  """8 fake devices: 12 pairs in steps of 8 (the second padded with zero images), each step as `distance` of its
  8 rows with the key folded with its first pair's index."""
  a, b = np.concatenate([A, A[:4]]), np.concatenate([B, B[4:]])
  key = jax.random.key(12)
  d = lpips_jax.score_pairs(elpips_params, a, b, key=key, batch_size=8)
  padded = [np.concatenate([x[8:], np.zeros((4, 64, 64, 3), np.float32)]) for x in (a, b)]
  expected = [lpips_jax.distance(elpips_params, A, B, key=jax.random.fold_in(key, 0)),
              lpips_jax.distance(elpips_params, *padded, key=jax.random.fold_in(key, 8))[:4]]
  np.testing.assert_allclose(d, np.concatenate(expected), rtol=1e-5)


def test_pairwise_averages_matrices_of_one_shared_sample_each(elpips_params):
  x = np.concatenate([A[:2], B[:1]])
  key = jax.random.key(13)
  m = lpips_jax.pairwise(elpips_params, x, key=key, samples=2)
  assert np.array_equal(m, m.T) and not np.diag(m).any()

  def sample_matrix(k):  # every image under sample k's one transformation and masks, each pair compared directly
    t, dropout = elpips.drawn(elpips.sample_key(key, k), 1)
    taps = elpips.taps_under(VARIANT, elpips_params, x, t, int(t.scale), dropout, normalize=False, shared=True)
    f = [lpips_jax.lpips.unit_normalize(tap) for tap in taps]
    i, j = np.triu_indices(len(x), 1)
    return i, j, np.asarray(lpips_jax.distance_from_features(elpips_params, tuple(t[i] for t in f),
                                                             tuple(t[j] for t in f)))

  i, j, d0 = sample_matrix(0)
  np.testing.assert_allclose(m[i, j], (d0 + sample_matrix(1)[2]) / 2, rtol=1e-5)
  group = lpips_jax.diversity(elpips_params, x[None], key=jax.random.key(4))
  np.testing.assert_allclose(group, lpips_jax.pairwise(elpips_params, x, key=jax.random.fold_in(jax.random.key(4), 0))
                             [i, j].mean(), rtol=1e-5)


def test_the_command_takes_samples_and_a_seed_and_names_them(elpips_params, tmp_path, monkeypatch, capsys):
  """The command in this process, with the seeded heads installed as if converted (their checksum in the manifest
  in place of the published file's)."""
  from PIL import Image

  from lpips_jax import weights
  from lpips_jax.command import main

  heads = {k: v for k, v in elpips_params.items() if k.startswith("lin")}
  name = weights.heads_file("vgg_ensemble", "0.1")
  (tmp_path / "vgg.safetensors").symlink_to(weights.user_dir() / "vgg.safetensors")
  monkeypatch.setitem(weights.manifest()[name], "sha256", weights.save(tmp_path / name, heads))
  monkeypatch.setenv("LPIPS_JAX_WEIGHTS", str(tmp_path))
  folders = []
  for side, images in (("a", A), ("b", B)):
    folders.append(tmp_path / side)
    folders[-1].mkdir()
    for k, x in enumerate(images):
      Image.fromarray(np.round((x + 1) * 127.5).astype(np.uint8)).save(folders[-1] / f"{k}.png")
  outputs = []
  for run in range(2):
    out = tmp_path / f"d{run}.csv"
    assert main(["--net", "elpips", "--samples", "1", "--seed", "5", "--batch-size", "8", *map(str, folders), "-o",
                 str(out)]) == 0
    outputs.append(out.read_text())
    summary = capsys.readouterr().err.splitlines()[-1]
    assert summary.startswith("lpips-jax: vgg_ensemble v0.1 (1 sample, seed 5): 8 pairs, mean "), summary
  assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 9
  assert main(["--net", "alex", "--samples", "3", *map(str, folders)]) == 1
  assert "--samples and --seed are E-LPIPS's (--net vgg_ensemble)" in capsys.readouterr().err
