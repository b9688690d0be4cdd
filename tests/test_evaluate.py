"""Scoring: hand-computed 2AFC/JND cases, equality with the official scorers, sharded distances over a padded batch."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import lpips_jax
from lpips_jax.train.data import load_image, read_2afc, read_jnd
from lpips_jax.train.evaluate import evaluate_2afc, evaluate_jnd, score_2afc, score_jnd, set_distances, voc_ap


def test_2afc_hand_computed_with_ties():
  d0 = [1.0, 2.0, 3.0, 3.0, 0.5]
  d1 = [2.0, 1.0, 3.0, 4.0, 0.5]
  judge = [0.2, 0.2, 0.7, 1.0, 0.0]
  # d0 < d1: 1 - judge; d1 < d0: judge; ties: 0.5 whatever the judge
  expected = (0.8 + 0.2 + 0.5 + 0.0 + 0.5) / 5
  assert score_2afc(d0, d1, judge) == pytest.approx(expected, abs=1e-15)
  assert score_2afc([0.1], [0.2], [0.0]) == 1.0
  assert score_2afc([0.1], [0.2], [1.0]) == 0.0
  assert score_2afc(np.reshape(d0, (5, 1, 1, 1)), np.asarray(d1, np.float32), judge) == pytest.approx(expected)


def test_2afc_rejects_mismatched_lengths():
  with pytest.raises(ValueError, match="as many elements"):
    score_2afc([1.0, 2.0], [1.0], [0.5, 0.5])


class FakeLoader:
  """Stands in for the official CustomDatasetDataLoader: batches whose `ref` carries the triplet indices."""

  def __init__(self, n, batch, **labels):
    self.n, self.batch, self.labels = n, batch, labels

  def load_data(self):
    for start in range(0, self.n, self.batch):
      index = torch.arange(start, min(start + self.batch, self.n))
      size = len(index)
      yield {"ref": index, "p0": torch.zeros(size), "p1": torch.ones(size),
             **{k: torch.from_numpy(v[index.numpy()]).reshape(size, 1, 1, 1) for k, v in self.labels.items()}}


def test_2afc_equals_the_official_score_on_the_same_arrays(official):
  rng = np.random.default_rng(0)
  n = 203
  d0 = rng.uniform(0, 1, n).astype(np.float32)
  d1 = rng.uniform(0, 1, n).astype(np.float32)
  d1[::7] = d0[::7]  # ties
  judge = rng.choice([0, .2, .4, .5, .6, .8, 1], n).astype(np.float32)

  def func(ref, p):  # d(ref, p0) or d(ref, p1), as an (N, 1, 1, 1) tensor like the official model's output
    chosen = np.where(p.numpy() == 0, d0[ref.numpy()], d1[ref.numpy()])
    return torch.from_numpy(chosen).reshape(-1, 1, 1, 1)

  theirs, _ = official.score_2afc_dataset(FakeLoader(n, 50, judge=judge), func)
  assert score_2afc(d0, d1, judge) == theirs  # exactly


def loop_voc_ap(rec, prec):
  """py-faster-rcnn's voc_ap (use_07_metric=False), written out with loops."""
  mrec = [0.0] + list(rec) + [1.0]
  mpre = [0.0] + list(prec) + [0.0]
  for i in range(len(mpre) - 1, 0, -1):
    mpre[i - 1] = max(mpre[i - 1], mpre[i])
  return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])


def test_jnd_hand_computed():
  # Sorted by distance: same = 1, 0, 1, 0 -> precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1.
  # Envelope: 1 up to recall 1/2, 2/3 up to 1 -> AP = 1/2 * 1 + 1/2 * 2/3.
  assert score_jnd([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0]) == pytest.approx(0.5 + 1 / 3, abs=1e-12)
  assert score_jnd([0.4, 0.3, 0.2, 0.1], [0, 1, 0, 1]) == pytest.approx(0.5 + 1 / 3, abs=1e-12)
  # Soft labels (fractions of 3 observers): TP = 1, 4/3; FP = 0, 2/3 -> precision 1, 2/3 at recall 3/4, 1.
  assert score_jnd([0.1, 0.5], [1, 1 / 3]) == pytest.approx(0.75 * 1 + 0.25 * 2 / 3, abs=1e-12)


def test_jnd_ties_keep_their_order():
  # d = 0.2 twice: a stable sort keeps [same 0, same 1] in input order -> labels 1, 0, 1 -> AP 1/2 + 1/2 * 2/3.
  assert score_jnd([0.2, 0.1, 0.2], [0, 1, 1]) == pytest.approx(0.5 + 1 / 3, abs=1e-12)
  # Reversed input order of the tie: labels 1, 1, 0 -> AP 1.
  assert score_jnd([0.2, 0.1, 0.2], [1, 1, 0]) == pytest.approx(1.0, abs=1e-12)


def test_jnd_all_same_labels():
  assert score_jnd([0.3, 0.1, 0.2], [1, 1, 1]) == 1.0  # precision 1 at every recall
  assert np.isnan(score_jnd([0.3, 0.1, 0.2], [0, 0, 0]))  # no positives: recall undefined


def test_jnd_flattens_distances():
  rng = np.random.default_rng(1)
  ds, sames = rng.uniform(size=40), rng.choice([0, 1 / 3, 2 / 3, 1], 40)
  assert score_jnd(ds.reshape(40, 1, 1, 1), sames.reshape(40, 1, 1, 1)) == score_jnd(ds, sames)


def test_jnd_map_equals_a_direct_voc_ap_and_the_official_one(official):
  rng = np.random.default_rng(2)
  for n in (1, 7, 300):
    ds = rng.uniform(size=n)
    sames = rng.choice([0, 1 / 3, 2 / 3, 1], n)
    sames[0] = 1  # at least one positive
    same = sames[np.argsort(ds, kind="stable")]
    tp, fp = np.cumsum(same), np.cumsum(1 - same)
    rec, prec = tp / np.sum(same), tp / (tp + fp)
    ours = score_jnd(ds, sames)
    assert ours == pytest.approx(loop_voc_ap(rec, prec), abs=1e-12)
    assert voc_ap(rec, prec) == pytest.approx(official.voc_ap(rec, prec), abs=1e-12)


def test_jnd_equals_the_official_scorer_given_flat_distances(official):
  # The official score_jnd_dataset works when func returns flat distances (as in 2018); with the (N, 1, 1, 1)
  # output of today's model it sorts along a length-1 axis (docs/official.md §4.2). Distinct distances: no tie order
  # issue.
  rng = np.random.default_rng(3)
  n = 120
  ds = rng.permutation(n).astype(np.float32) / n
  sames = rng.choice([0, 1 / 3, 2 / 3, 1], n).astype(np.float32)
  flat = lambda p0, p1: torch.from_numpy(ds[p0.numpy()])

  class PairLoader(FakeLoader):
    def load_data(self):
      for batch in super().load_data():
        yield {"p0": batch["ref"], "p1": batch["ref"], "same": batch["same"]}

  theirs, _ = official.score_jnd_dataset(PairLoader(n, 50, same=sames), flat)
  assert score_jnd(ds, sames) == pytest.approx(theirs, abs=1e-12)
  nested = lambda p0, p1: torch.from_numpy(ds[p0.numpy()]).reshape(-1, 1, 1, 1)
  broken, _ = official.score_jnd_dataset(PairLoader(n, 50, same=sames), nested)
  assert broken != pytest.approx(theirs)


# -- sharded distances over a set ------------------------------------------------------------------------------------

def write_set(root, kind, n=13, seed=0):
  """A 2AFC (n triplets) or JND (n pairs) set of 80x80 PNGs (resized to 64 by the loader) in `root`."""
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (n, 80, 80, 3), np.uint8)
  noisy = lambda: np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
  folders = {"ref": base, "p0": noisy(), "p1": noisy()} if kind == "2afc" else {"p0": base, "p1": noisy()}
  for name, images in folders.items():
    (root / name).mkdir(parents=True)
    for i, image in enumerate(images):
      Image.fromarray(image).save(root / name / f"{i:03d}.png")
  label = "judge" if kind == "2afc" else "same"
  (root / label).mkdir()
  for i in range(n):
    np.save(root / label / f"{i:03d}.npy", np.array([rng.uniform()]))
  return root


def test_sharded_set_distances_over_a_padded_last_batch(tmp_path):
  import jax

  root_2afc, root_jnd = write_set(tmp_path / "2afc", "2afc"), write_set(tmp_path / "jnd", "jnd")
  params = lpips_jax.load("squeeze")
  data = read_2afc([root_2afc])
  images = {k: np.stack([load_image(p) for p in getattr(data, k)]) for k in ("ref", "p0", "p1")}
  expected = [np.asarray(lpips_jax.distance(params, images["ref"], images[k])) for k in ("p0", "p1")]
  assert jax.device_count() == 8
  for mesh in (None, jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])):
    # batch 5 -> padded to 8 on 8 devices; 13 = 8 + 5 real examples, the rest padding.
    d0, d1 = set_distances(params, data, batch_size=5, mesh=mesh)
    assert d0.shape == d1.shape == (13,)
    np.testing.assert_allclose(d0, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d1, expected[1], rtol=1e-5, atol=1e-6)
  score, _, _ = evaluate_2afc(params, data, batch_size=5)
  assert score == score_2afc(expected[0], expected[1], data.judge)

  jnd = read_jnd([root_jnd])
  pairs = [np.stack([load_image(p) for p in getattr(jnd, k)]) for k in ("p0", "p1")]
  d_expected = np.asarray(lpips_jax.distance(params, *pairs))
  score, d = evaluate_jnd(params, jnd, batch_size=6)
  np.testing.assert_allclose(d, d_expected, rtol=1e-5, atol=1e-6)
  assert score == score_jnd(d, jnd.same)


def test_eval_command_scores_released_weights(tmp_path, capsys):
  from lpips_jax.train import eval_main as eval_command

  write_set(tmp_path / "2afc" / "val" / "mine", "2afc", n=6)
  out = tmp_path / "scores.json"
  scores = eval_command.eval_command(["--weights", "alex", "--dataroot", str(tmp_path), "--datasets", "val/mine",
                              "--json", str(out)])
  data = read_2afc([tmp_path / "2afc" / "val" / "mine"])
  params = lpips_jax.load("alex")
  ref, p0, p1 = (np.stack([load_image(p) for p in getattr(data, k)]) for k in ("ref", "p0", "p1"))
  expected = score_2afc(lpips_jax.distance(params, ref, p0), lpips_jax.distance(params, ref, p1), data.judge)
  assert scores == {"val/mine": expected}
  assert f"Dataset [val/mine]: {100 * expected:.2f}" in capsys.readouterr().out
  assert out.exists()


def test_eval_command_gives_bootstrap_intervals_and_a_paired_comparison(tmp_path, capsys):
  from lpips_jax.stats import bootstrap_ci, paired_bootstrap
  from lpips_jax.train import eval_main as eval_command
  from lpips_jax.train.evaluate import agreement_2afc

  write_set(tmp_path / "2afc" / "val" / "mine", "2afc", n=12)
  eval_command.main(["--weights", "alex", "--compare", "squeeze", "--dataroot", str(tmp_path), "--datasets",
                     "val/mine", "--resamples", "500"])
  printed = capsys.readouterr().out
  data = read_2afc([tmp_path / "2afc" / "val" / "mine"])
  ref, p0, p1 = (np.stack([load_image(p) for p in getattr(data, k)]) for k in ("ref", "p0", "p1"))
  items = {net: agreement_2afc(lpips_jax.distance(lpips_jax.load(net), ref, p0),
                               lpips_jax.distance(lpips_jax.load(net), ref, p1), data.judge) for net in
           ("alex", "squeeze")}
  ci = bootstrap_ci(items["alex"], resamples=500)
  assert f"(95% CI {100 * ci.low:.2f}-{100 * ci.high:.2f})" in printed and ci.low <= ci.mean <= ci.high
  diff = paired_bootstrap(items["alex"], items["squeeze"], resamples=500)
  assert (f"minus squeeze: {100 * diff.difference:+.2f} (95% CI {100 * diff.low:+.2f} to {100 * diff.high:+.2f}"
          in printed)


def test_eval_command_errors_are_one_line(tmp_path, capsys):
  from lpips_jax.train import eval_main as eval_command

  assert eval_command.main(["--dataroot", str(tmp_path / "missing"), "--datasets", "val/cnn"]) == 1
  assert re.fullmatch(r"lpips-jax eval: error: .*missing/2afc/val/cnn/ref is not a directory.*\n",
                      capsys.readouterr().err)
  assert eval_command.main(["--weights", str(tmp_path / "none.safetensors")]) == 1
  assert re.fullmatch(r"lpips-jax eval: error: weights file .*none.safetensors does not exist\n",
                      capsys.readouterr().err)


def test_eval_command_refuses_bad_numbers_in_one_line(capsys):
  from lpips_jax.train import eval_main as eval_command

  for argv, error in ((["--batch_size", "0"], "--batch-size must be at least 1, got 0"),  # was a ZeroDivisionError
                      (["--resamples", "0"], "--resamples must be at least 1, got 0"),
                      (["--batch-size", "many"], "argument --batch-size: invalid int value: 'many'")):
    with pytest.raises(SystemExit) as caught:
      eval_command.main(argv)
    assert caught.value.code == 2 and capsys.readouterr().err == f"lpips-jax eval: error: {error} (see --help)\n"


def test_ctrl_c_ends_the_eval_command_with_one_line(tmp_path):
  import os
  import signal
  import subprocess
  import sys
  import tempfile

  write_set(tmp_path / "2afc" / "val" / "mine", "2afc", n=6)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  # Outside the repository, so that `python -m` imports the installed package (see test_train.command).
  process = subprocess.Popen([sys.executable, "-m", "lpips_jax", "eval", "--dataroot", str(tmp_path), "--resamples",
                              "100", "--json", str(tmp_path / "scores.json"), "--datasets", *["val/mine"] * 200],
                             cwd=tempfile.gettempdir(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  assert process.stdout.readline().startswith("  Dataset [val/mine]: ")  # scoring the second of 200 sets
  process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=300)
  assert process.returncode == 130 and err.endswith("\nlpips-jax eval: interrupted\n"), err[-3000:]
  assert "Traceback" not in err and "Mean" not in out and not (tmp_path / "scores.json").exists()
  assert all(line.startswith("  Dataset [val/mine]: ") for line in out.splitlines()) and out[-1:] in ("", "\n")


def test_eval_command_writes_json_atomically(tmp_path, monkeypatch):
  from lpips_jax.train import eval_main as eval_command

  write_set(tmp_path / "2afc" / "val" / "mine", "2afc", n=4)
  out = tmp_path / "scores.json"
  out.write_text("the previous scores")
  scores = eval_command.eval_command(["--dataroot", str(tmp_path), "--datasets", "val/mine", "--resamples", "10",
                                      "--json", str(out)])
  assert json.loads(out.read_text()) == scores
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2afc", "scores.json"]  # no temporary file left


def test_eval_on_one_triplet_prints_no_interval_rather_than_a_zero_width_one(tmp_path, capsys):
  from lpips_jax.train import eval_main

  write_set(tmp_path / "2afc" / "val" / "one", "2afc", n=1)
  eval_main.eval_command(["--dataroot", str(tmp_path), "--datasets", "val/one", "--compare", "squeeze",
                          "--resamples", "50"])
  out = capsys.readouterr().out
  assert "(no interval: 1 triplet; a bootstrap needs at least 2)" in out, out
  assert re.search(r"minus squeeze: [+-]\d+\.\d\d \(no interval: 1 triplet; a bootstrap needs at least 2\)", out), out
  assert "p = " not in out and "CI" not in out


def test_eval_compare_of_identical_choices_says_there_is_no_spread(tmp_path, capsys):
  from lpips_jax.train import eval_main

  write_set(tmp_path / "2afc" / "val" / "mine", "2afc", n=4)
  eval_main.eval_command(["--dataroot", str(tmp_path), "--datasets", "val/mine", "--compare", "alex",
                          "--resamples", "50"])
  assert "minus alex: +0.00 on every triplet (no interval or p-value: no spread to resample)" in capsys.readouterr().out


@pytest.mark.parametrize("same,kind", [(0.0, "no pair was judged the same"), (1.0, "every pair was judged the same")])
def test_a_jnd_set_without_both_kinds_of_pairs_is_one_line(same, kind, tmp_path, capsys):
  from lpips_jax.train import eval_main

  root = write_set(tmp_path / "jnd" / "val" / "flat", "jnd", n=3)
  for path in (root / "same").iterdir():
    np.save(path, np.array([same]))
  assert eval_main.main(["--mode", "jnd", "--dataroot", str(tmp_path), "--datasets", "val/flat"]) == 1
  assert capsys.readouterr().err == (f"lpips-jax eval: error: JND set {tmp_path / 'jnd' / 'val' / 'flat'}: {kind}, "
                                     f"and the mAP needs pairs judged the same and pairs judged different; check its "
                                     f"same/ files\n")


@pytest.mark.parametrize("flag", ["--compare", "--weights"])
def test_an_empty_weights_name_is_refused(flag, capsys):
  from lpips_jax.train import eval_main

  with pytest.raises(SystemExit) as caught:
    eval_main.main([flag, ""])
  assert caught.value.code == 2
  assert capsys.readouterr().err.startswith(f"lpips-jax eval: error: {flag} is empty; give a net name (alex, vgg, "
                                            f"squeeze, alex_st, vgg_st) or the path of a .safetensors file")
