"""Bootstrap intervals: coverage on simulated data, 1/sqrt(n) width, a slow reference loop, paired tests, errors."""
import tracemalloc

import numpy as np
import pytest

from lpips_jax import stats
from lpips_jax.stats import bootstrap_ci, paired_bootstrap


def agreements(rng, n, skill):
  """Per-triplet 2AFC agreements of a simulated metric that ranks like people with probability ~`skill`."""
  truth = rng.normal(0, 1, n)  # > 0: people find p1 closer
  judge = rng.binomial(5, 1 / (1 + np.exp(-2 * truth))) / 5  # five people per triplet, as BAPPS val
  seen = truth + rng.normal(0, 1 / skill, n)  # the metric's noisy view of the same triplet
  d0, d1 = np.maximum(seen, 0), np.maximum(-seen, 0)  # d0 == d1 == 0 never happens with continuous noise
  return (d0 < d1) * (1 - judge) + (d1 < d0) * judge + (d0 == d1) * 0.5


@pytest.mark.parametrize("confidence", [0.8, 0.95])
@pytest.mark.parametrize("kind", ["distances", "2afc"])
def test_interval_covers_the_true_mean_at_the_stated_rate(kind, confidence):
  # 400 simulated sets of 200 items: the coverage's standard error is ~0.011 (0.95) / 0.02 (0.8), so the bounds
  # are ~3.5 standard errors wide; intervals of the wrong width (std instead of standard error, n/4 resamples...)
  # fail.
  rng = np.random.default_rng(1)
  if kind == "distances":  # LPIPS-like: skewed, in [0, 1]
    true_mean, draw = 2 / 7, lambda: rng.beta(2, 5, 200)
  else:
    true_mean = np.mean(agreements(np.random.default_rng(99), 2_000_000, skill=1.5))  # the population score
    draw = lambda: agreements(rng, 200, skill=1.5)
  intervals = [bootstrap_ci(draw(), confidence=confidence, resamples=1000, seed=s) for s in range(400)]
  coverage = np.mean([ci.low <= true_mean <= ci.high for ci in intervals])
  margin = 3.5 * np.sqrt(confidence * (1 - confidence) / 400) + 0.01  # +0.01: the percentile method's small bias
  assert abs(coverage - confidence) < margin, coverage


def latent_set(rng, n):
  """The distances of n simulated images: image i is a point u_i ~ U(0, 1) and d(i, j) = |u_i - u_j|, so the mean
  distance of images like these is E|U - U'| = 1/3 exactly."""
  u = rng.uniform(0, 1, n)
  return np.abs(u[:, None] - u[None, :])


def test_all_pairs_interval_resamples_images_and_covers_the_true_mean():
  # 300 simulated sets of 40 images (780 pairs each). The coverage's standard error at 0.95 is ~0.013: the band is
  # ~4 of them wide below (the percentile method undercovers a little at N = 40) and ~3 above.
  rng = np.random.default_rng(5)
  sets = [latent_set(rng, 40) for _ in range(300)]
  upper = np.triu_indices(40, 1)
  images = [stats.all_pairs_bootstrap_ci(d, resamples=500, seed=k) for k, d in enumerate(sets)]
  pairs = [bootstrap_ci(d[upper], resamples=500, seed=k) for k, d in enumerate(sets)]
  covered = lambda intervals: np.mean([ci.low <= 1 / 3 <= ci.high for ci in intervals])
  assert 0.89 <= covered(images) <= 0.99, covered(images)
  # The pairs resampled as if independent: an interval several times too narrow, which misses the truth often.
  assert covered(pairs) < 0.6, covered(pairs)
  widths = [(a.high - a.low) / (b.high - b.low) for a, b in zip(images, pairs)]
  assert np.median(widths) > 2.5, np.median(widths)  # ~3 at N = 40, growing like sqrt(N)
  for ci, d in zip(images, sets):
    assert ci.low <= ci.mean <= ci.high and ci.mean == d[upper].mean()


def test_all_pairs_interval_depends_on_the_seed_only_and_pairs_matrix_is_pair_order(monkeypatch):
  d = latent_set(np.random.default_rng(6), 9)
  reference = stats.all_pairs_bootstrap_ci(d, resamples=101, seed=3)
  assert stats.all_pairs_bootstrap_ci(d, resamples=101, seed=4) != reference
  for chunk in (1, 9 * 3 + 1, 10**9):  # one resample per chunk, 3 per chunk, all at once
    monkeypatch.setattr(stats, "_CHUNK", chunk)
    assert stats.all_pairs_bootstrap_ci(d, resamples=101, seed=3) == reference
  values = [d[i, j] for i in range(9) for j in range(i + 1, 9)]  # itertools.combinations order
  np.testing.assert_array_equal(stats.pairs_matrix(values, 9), d)


@pytest.mark.parametrize("matrix,message", [
    (np.zeros((3, 4)), r"matrix has shape \(3, 4\); expected the square \[N, N\] matrix"),
    (np.zeros((1, 1)), "matrix holds 1 image; an interval over the images needs at least 3"),
    (np.array([[0, 1.0, 3], [2.0, 0, 1], [3, 1, 0]]), r"matrix is not symmetric \(entry \[0, 1\] is 1.0, entry "
     r"\[1, 0\] is 2.0\)"),
    (np.array([[0, np.nan, 1], [np.nan, 0, 1], [1, 1, 0]]), "matrix holds 2 non-finite values"),
])
def test_all_pairs_interval_refuses_what_is_not_a_set_s_distances(matrix, message):
  with pytest.raises(ValueError, match=message):
    stats.all_pairs_bootstrap_ci(matrix)


def test_pairs_matrix_refuses_a_count_that_is_not_all_pairs():
  with pytest.raises(ValueError, match="4 values are not the pairs of 3 images, which are 3"):
    stats.pairs_matrix([0.1, 0.2, 0.3, 0.4], 3)


def test_interval_shrinks_like_one_over_sqrt_n():
  rng = np.random.default_rng(2)
  intervals = {n: bootstrap_ci(rng.beta(2, 5, n), resamples=4000) for n in (400, 1600, 6400)}
  widths = {n: ci.high - ci.low for n, ci in intervals.items()}
  assert 1.8 < widths[400] / widths[1600] < 2.2 and 1.8 < widths[1600] / widths[6400] < 2.2, widths
  sigma = np.sqrt(2 * 5 / (7 ** 2 * 8))  # the Beta(2, 5) standard deviation
  np.testing.assert_allclose(widths[6400], 2 * 1.959964 * sigma / np.sqrt(6400), rtol=0.1)  # the normal theory


def test_bootstrap_matches_a_slow_reference_loop():
  values = np.array([0.31, 0.05, 0.77, 0.42, 0.12, 0.64, 0.29])
  rng = np.random.default_rng(7)
  means = [np.mean(values[rng.integers(0, len(values), len(values))]) for _ in range(300)]
  low, high = np.quantile(means, [0.05, 0.95])
  assert bootstrap_ci(values, confidence=0.9, resamples=300, seed=7) == (np.mean(values), low, high)


def test_paired_bootstrap_matches_a_slow_reference_loop():
  rng = np.random.default_rng(3)
  a, b = rng.uniform(0, 1, 9), rng.uniform(0, 1, 9)
  loop = np.random.default_rng(5)
  diffs = []
  for _ in range(500):
    i = loop.integers(0, 9, 9)
    diffs.append(np.mean(a[i]) - np.mean(b[i]))
  diffs = np.array(diffs)
  low, high = np.quantile(diffs, [0.025, 0.975])
  p = min(1, 2 * (min(np.sum(diffs <= 0), np.sum(diffs >= 0)) + 1) / 501)
  result = paired_bootstrap(a, b, resamples=500, seed=5)
  np.testing.assert_allclose(result, (np.mean(a) - np.mean(b), low, high, p), rtol=1e-12, atol=1e-15)


def test_result_depends_on_the_seed_only_not_on_the_chunk_size(monkeypatch):
  values = np.random.default_rng(4).uniform(0, 1, 37)
  reference = bootstrap_ci(values, resamples=101, seed=11)
  assert bootstrap_ci(values, resamples=101, seed=11) == reference
  assert bootstrap_ci(values, resamples=101, seed=12) != reference
  for chunk in (1, 40, 37 * 3 + 5, 10**9):  # one resample at a time, 1 or 3 per chunk, all at once
    monkeypatch.setattr(stats, "_CHUNK", chunk)
    assert bootstrap_ci(values, resamples=101, seed=11) == reference


def test_many_resamples_of_many_items_stay_within_the_chunk_memory():
  values = np.random.default_rng(5).uniform(0, 1, 100_000)
  tracemalloc.start()
  try:
    ci = bootstrap_ci(values, resamples=500)  # drawn at once: 5e7 indices, 400 MB
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 100e6, peak
  assert ci.low < np.mean(values) < ci.high and ci.high - ci.low < 0.005


def test_paired_bootstrap_detects_a_real_difference_that_separate_intervals_miss():
  rng = np.random.default_rng(6)
  hard = rng.uniform(0, 1, 300)  # per-item difficulty, shared by both metrics
  a, b = hard + 0.03 + rng.normal(0, 0.05, 300), hard + rng.normal(0, 0.05, 300)
  ci_a, ci_b = bootstrap_ci(a), bootstrap_ci(b)
  assert ci_a.low < ci_b.high  # unpaired, the intervals overlap
  result = paired_bootstrap(a, b)
  assert result.p_value == 2 / (10_000 + 1)  # the smallest p 10,000 resamples give: none shows no difference
  assert 0 < result.low < 0.03 < result.high
  np.testing.assert_allclose(result.difference, np.mean(a) - np.mean(b), rtol=1e-12)
  flipped = paired_bootstrap(b, a)
  np.testing.assert_allclose([flipped.difference, flipped.low, flipped.high],
                             [-result.difference, -result.high, -result.low], rtol=1e-9)
  assert flipped.p_value == result.p_value


def test_paired_bootstrap_on_2afc_agreements_of_a_better_metric():
  rng = np.random.default_rng(8)
  state = rng.bit_generator.state
  better = agreements(rng, 3000, skill=3.0)
  rng.bit_generator.state = state  # the same triplets and judges, a noisier metric
  worse = agreements(rng, 3000, skill=1.0)
  result = paired_bootstrap(better, worse, resamples=2000)
  assert result.low > 0.05 and result.p_value == 2 / (2000 + 1)


def test_paired_bootstrap_is_calibrated_under_no_difference():
  # 200 null data sets: "p < 0.05" should happen ~5% of the time (binomial sd 1.5%), not never nor often.
  rng = np.random.default_rng(9)
  ps = []
  for s in range(200):
    hard = rng.uniform(0, 1, 100)
    ps.append(paired_bootstrap(hard + rng.normal(0, 0.1, 100), hard + rng.normal(0, 0.1, 100), resamples=1000,
                               seed=s).p_value)
  assert 0.01 <= np.mean(np.array(ps) < 0.05) <= 0.1
  with pytest.raises(ValueError, match="a - b is 0 on every one of the 5 items: the difference has no spread"):
    paired_bootstrap(np.arange(5.0), np.arange(5.0), resamples=100)  # no interval, rather than [0, 0] and p = 1


def test_degenerate_inputs():
  assert bootstrap_ci(np.full(10, 0.5), resamples=10) == (0.5, 0.5, 0.5)  # ten equal items: the mean is certain
  assert bootstrap_ci(np.arange(6.0).reshape(2, 3), resamples=10).mean == 2.5  # flattened


def test_huge_finite_values_give_finite_intervals():
  assert bootstrap_ci([1e308] * 3, resamples=10) == (1e308, 1e308, 1e308)  # the sum overflows, the mean does not
  ci = bootstrap_ci([1e308, -1e308, 1.5e308], resamples=200)
  assert all(np.isfinite(ci)) and ci.low <= ci.mean <= ci.high
  assert all(np.isfinite(paired_bootstrap([1e308, 1.5e308, 2e307], [5e307, 0, 1e308], resamples=50)))
  ci = stats.all_pairs_bootstrap_ci(stats.pairs_matrix([1e308, 1.5e308, 1.7e308], 3), resamples=50)
  assert all(np.isfinite(ci)) and ci.low <= ci.mean <= ci.high


@pytest.mark.parametrize("call, message", [
    (lambda: bootstrap_ci([]), "values is empty"),
    (lambda: bootstrap_ci([0.1, np.nan, 0.3]), "values holds 1 non-finite values .*index 1"),
    (lambda: bootstrap_ci([0.1, np.inf]), "non-finite"),
    (lambda: paired_bootstrap([0.1, 0.2], [0.1, -np.inf]), "b holds 1 non-finite"),
    (lambda: paired_bootstrap([0.1, 0.2], [0.1]), "same items; got 2 and 1"),
    (lambda: paired_bootstrap([], []), "a is empty"),
    # one item: no spread to resample, so no interval (not a zero-width one)
    (lambda: bootstrap_ci([0.3]), r"values holds 1 value; a bootstrap interval needs at least 2 \(one item has no "
     r"spread to resample\)"),
    (lambda: paired_bootstrap([0.3], [0.1]), "a holds 1 value; a bootstrap interval needs at least 2"),
    (lambda: paired_bootstrap([0.5, 0.75, 1.0], [0.25, 0.5, 0.75]), r"a - b is 0.25 on every one of the 3 items: the "
     "difference has no spread to resample, so there is no interval or p-value"),
    (lambda: stats.all_pairs_bootstrap_ci(stats.pairs_matrix([0.3], 2)), r"matrix holds 2 images; an interval over "
     r"the images needs at least 3 \(the resamples of 2 images all hold their one pair\)"),
    (lambda: bootstrap_ci([0.1, 0.2], confidence="0.95"), r"confidence must be in \(0, 1\), a number such as 0.95; "
     "got '0.95'"),
    (lambda: bootstrap_ci([0.1, 0.2], confidence=None), "confidence must be in .*; got None"),
    (lambda: bootstrap_ci([0.1, 0.2], seed=-1), "seed must be a non-negative integer .*; got -1"),
    (lambda: paired_bootstrap([0.1, 0.2], [0.3, 0.5], seed=1.5), "seed must be a non-negative integer .*; got 1.5"),
    (lambda: bootstrap_ci(["a", "b"]), "values must be numbers"),
    (lambda: bootstrap_ci([0.1], confidence=0.0), "confidence must be in"),
    (lambda: bootstrap_ci([0.1], confidence=95), "confidence must be in"),
    (lambda: bootstrap_ci([0.1], resamples=0), "resamples must be a positive integer"),
    (lambda: bootstrap_ci([0.1], resamples=10.5), "resamples must be a positive integer"),
    (lambda: paired_bootstrap([0.1], [0.2], resamples=True), "resamples must be a positive integer"),
])
def test_errors_name_the_problem(call, message):
  with pytest.raises(ValueError, match=message):
    call()
