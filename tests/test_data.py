"""BAPPS readers: the official transform bit for bit, alignment and its errors, seeded order, batches, prefetch."""
import threading
import time

import numpy as np
import pytest
from PIL import Image

from lpips_jax.train.data import JND, TwoAFC, batches, epoch_order, load_image, prefetch, read_2afc, read_jnd


def official_transform():
  """The official loaders' transform: Resize(64) (PIL bilinear), ToTensor, Normalize(0.5, 0.5).

  torchvision is importable here because the `official` fixture has set it up (conftest).
  """
  import torchvision.transforms as transforms

  return transforms.Compose([transforms.Resize(64), transforms.ToTensor(),
                             transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


@pytest.mark.parametrize("size,mode", [((256, 256), "RGB"), ((64, 64), "RGB"), ((100, 80), "RGB"),
                                       ((70, 130), "RGBA"), ((96, 96), "L")])
def test_load_image_equals_the_official_transform(tmp_path, size, mode, official):
  rng = np.random.default_rng(0)
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  pixels = rng.integers(0, 256, (size[1], size[0], channels), np.uint8)
  image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
  path = tmp_path / "x.png"
  image.save(path)
  theirs = official_transform()(Image.open(path).convert("RGB")).numpy().transpose(1, 2, 0)
  ours = load_image(path)
  assert ours.dtype == np.float32 and min(ours.shape[:2]) == 64
  np.testing.assert_array_equal(ours, theirs)  # bit for bit
  assert ours.min() >= -1 and ours.max() <= 1


def write_triplets(root, names, judge=0.5, folders=("ref", "p0", "p1")):
  for folder in folders:
    (root / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
      Image.fromarray(np.full((8, 8, 3), len(name), np.uint8)).save(root / folder / f"{name}.png")
  (root / "judge").mkdir(exist_ok=True)
  for i, name in enumerate(names):
    np.save(root / "judge" / f"{name}.npy", np.array([judge if np.isscalar(judge) else judge[i]]))


def test_read_2afc_aligns_by_sorted_name_and_combines_sets(tmp_path):
  write_triplets(tmp_path / "a", ["2", "10", "1"], judge=[0.2, 1.0, 0.0])
  write_triplets(tmp_path / "b", ["x"], judge=0.6)
  data = read_2afc([tmp_path / "a", tmp_path / "b"])
  assert isinstance(data, TwoAFC)
  assert [p.split("/")[-2:] for p in data.ref] == [["ref", "1.png"], ["ref", "10.png"], ["ref", "2.png"],
                                                  ["ref", "x.png"]]
  assert [p.split("/")[-2:] for p in data.p1][1] == ["p1", "10.png"]
  np.testing.assert_array_equal(data.judge, np.float32([0.0, 1.0, 0.2, 0.6]))
  assert data.judge.dtype == np.float32


def test_read_jnd(tmp_path):
  root = tmp_path / "jnd"
  write_triplets(root, ["a", "b"], folders=("p0", "p1"))
  (root / "judge").rename(root / "same")
  data = read_jnd([root])
  assert isinstance(data, JND) and len(data.p0) == 2 and data.same.tolist() == [0.5, 0.5]


def test_count_mismatch_names_the_folders_and_counts(tmp_path):
  write_triplets(tmp_path / "s", ["1", "2", "3"])
  (tmp_path / "s" / "p1" / "3.png").unlink()
  with pytest.raises(ValueError, match=r"s: the folders hold different numbers of files: ref/ 3, p0/ 3, p1/ 2, "
                                       r"judge/ 3"):
    read_2afc([tmp_path / "s"])


def test_name_mismatch_missing_folder_and_bad_judgments_are_errors(tmp_path):
  write_triplets(tmp_path / "s", ["1", "2"])
  (tmp_path / "s" / "p0" / "2.png").rename(tmp_path / "s" / "p0" / "3.png")
  with pytest.raises(ValueError, match=r"file 1 of ref/ is '2' but of p0/ is '3'"):
    read_2afc([tmp_path / "s"])
  write_triplets(tmp_path / "t", ["1"], folders=("ref", "p0"))
  with pytest.raises(FileNotFoundError, match=r"t/p1 is not a directory"):
    read_2afc([tmp_path / "t"])
  write_triplets(tmp_path / "u", ["1"])
  np.save(tmp_path / "u" / "judge" / "1.npy", np.array([0.5, 0.5]))
  with pytest.raises(ValueError, match=r"1.npy holds an array of shape \(2,\)"):
    read_2afc([tmp_path / "u"])
  np.save(tmp_path / "u" / "judge" / "1.npy", np.array([1.5]))
  with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
    read_2afc([tmp_path / "u"])
  (tmp_path / "v" / "ref").mkdir(parents=True)
  for folder in ("p0", "p1", "judge"):
    (tmp_path / "v" / folder).mkdir()
  with pytest.raises(ValueError, match="no files found"):
    read_2afc([tmp_path / "v"])


def test_epoch_order_is_seeded_and_differs_between_epochs():
  a = epoch_order(100, seed=3, epoch=0)
  np.testing.assert_array_equal(a, epoch_order(100, seed=3, epoch=0))
  assert sorted(a) == list(range(100))
  assert not np.array_equal(a, epoch_order(100, seed=3, epoch=1))
  assert not np.array_equal(a, epoch_order(100, seed=4, epoch=0))


def test_batches_pad_the_last_batch_and_mark_it(tmp_path):
  names = [str(i) for i in range(5)]
  write_triplets(tmp_path / "s", names, judge=[0.1, 0.2, 0.3, 0.4, 0.5])
  data = read_2afc([tmp_path / "s"])
  order = [4, 0, 3, 1, 2]
  out = list(batches(data, order, 2, pad_to=4))
  assert len(out) == 3
  for batch in out:
    assert batch["ref"].shape == (4, 64, 64, 3) and batch["judge"].shape == batch["weight"].shape == (4,)
  np.testing.assert_allclose(out[0]["judge"], [0.5, 0.1, 0, 0])
  np.testing.assert_array_equal(out[2]["weight"], [1, 0, 0, 0])
  np.testing.assert_array_equal(out[2]["ref"][1:], 0)
  np.testing.assert_array_equal(out[0]["p0"][0], load_image(data.p0[4]))


def test_prefetch_keeps_order_runs_ahead_and_reraises():
  produced = []

  def slow():
    for i in range(6):
      produced.append(i)
      yield i

  stream = prefetch(slow(), 3)
  assert next(stream) == 0
  time.sleep(0.2)
  assert len(produced) >= 4  # decoded ahead while the consumer was busy
  assert list(stream) == [1, 2, 3, 4, 5]

  def failing():
    yield 1
    raise OSError("disk gone")

  stream = prefetch(failing(), 2)
  assert next(stream) == 1
  with pytest.raises(OSError, match="disk gone"):
    next(stream)


def test_prefetch_thread_stops_when_the_consumer_stops():
  before = threading.active_count()
  stream = prefetch(iter(range(1000)), 2)
  assert next(stream) == 0
  stream.close()
  time.sleep(0.3)
  assert threading.active_count() == before
