"""BAPPS readers: the official transform bit for bit, alignment and its errors, seeded order, batches, prefetch."""
import pickle
import threading
import time

import numpy as np
import pytest
from PIL import Image

from lpips_jax.files import ImageFileError
from lpips_jax.scoring import prefetch
from lpips_jax.train.data import JND, TwoAFC, batches, epoch_order, load_image, read_2afc, read_jnd


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
  with pytest.raises(ValueError, match=r"1.npy holds 1.5; a judgment is .*a number in \[0, 1\]"):
    read_2afc([tmp_path / "u"])
  (tmp_path / "v" / "ref").mkdir(parents=True)
  for folder in ("p0", "p1", "judge"):
    (tmp_path / "v" / folder).mkdir()
  with pytest.raises(ValueError, match="no files found"):
    read_2afc([tmp_path / "v"])


@pytest.mark.parametrize("size", [(64, 64), (100, 80)])
def test_a_16_bit_png_is_read_at_full_precision_not_clipped_to_white(tmp_path, size, official):
  rng = np.random.default_rng(1)
  gray8 = rng.integers(0, 256, (size[1], size[0]), np.uint8)
  Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # the same picture in 16 bits
  Image.fromarray(gray8).save(tmp_path / "flat.png")
  assert Image.open(tmp_path / "deep.png").mode == "I;16"
  clipped = official_transform()(Image.open(tmp_path / "deep.png").convert("RGB")).numpy()
  assert clipped.mean() > 0.95  # what the official loader makes of it: nearly all white
  deep, flat = load_image(tmp_path / "deep.png"), load_image(tmp_path / "flat.png")
  assert deep.shape == flat.shape == (64, size[0] * 64 // size[1], 3)
  if size == (64, 64):
    np.testing.assert_allclose(deep, flat, rtol=0, atol=1e-6)  # v * 257 / 65535 is v / 255
  else:  # resized in float against resized on 8-bit values: within one 8-bit step
    np.testing.assert_allclose(deep, flat, rtol=0, atol=1 / 127.5 + 1e-6)
    assert np.abs(deep - flat).max() > 1e-4  # the 16-bit image was not resized at 8 bits


def png_bytes(size=(16, 16)):
  import io

  out = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), np.uint8)).save(out, format="PNG")
  return out.getvalue()


@pytest.mark.parametrize("kind", ["truncated", "not-an-image", "empty"])
def test_an_unreadable_image_names_the_file(tmp_path, kind):
  write_triplets(tmp_path / "s", ["1", "2"])
  bad = tmp_path / "s" / "p0" / "2.png"
  bad.write_bytes({"truncated": png_bytes((64, 64))[:300], "not-an-image": b"<html>404</html>", "empty": b""}[kind])
  data = read_2afc([tmp_path / "s"])
  with pytest.raises(ImageFileError) as error:
    list(batches(data, [0, 1], 2))
  message = str(error.value)
  assert message.startswith(f"{bad}: not a readable image (") and "\n" not in message, message
  assert message.endswith("); check that it is a complete image file")


# (kind, writes the judgment file, the message after its path)
JUDGMENTS = [
    ("pickled", lambda path: path.write_bytes(pickle.dumps(np.array([0.5]))),
     ": not a numpy array file (pickled or text data); a judgment file holds one number in [0, 1], as numpy.save "
     "writes it: write it again"),
    ("text", lambda path: path.write_text("0.5\n"), ": not a numpy array file (pickled or text data)"),
    ("object", lambda path: np.save(path, np.array([0.5], object), allow_pickle=True),
     ": not a numpy array file (Object arrays cannot be loaded when allow_pickle=False)"),
    ("truncated", lambda path: (np.save(path, np.array([0.5])), path.write_bytes(path.read_bytes()[:-4])),
     ": not a numpy array file (Failed to read all data for array."),
    ("empty", lambda path: path.write_bytes(b""), ": not a numpy array file (No data left in file)"),
    ("npz", lambda path: path.write_bytes(npz_bytes()), ": an .npz archive, not a numpy array file"),
    ("strings", lambda path: np.save(path, np.array(["0.5"])), " holds a <U3 array; a judgment file holds one number"),
    ("complex", lambda path: np.save(path, np.array([0.5 + 0.5j])), " holds a complex128 array"),
    ("nan", lambda path: np.save(path, np.array([np.nan])), " holds nan; a judgment is the fraction of people who "
     "chose p1 (2AFC) or saw no difference (JND): a number in [0, 1]"),
    ("negative", lambda path: np.save(path, np.array([-0.25], np.float32)), " holds -0.25; a judgment is"),
]


def npz_bytes():
  import io

  out = io.BytesIO()
  np.savez(out, judge=np.array([0.5]))
  return out.getvalue()


@pytest.mark.parametrize("kind,write,message", JUDGMENTS, ids=[j[0] for j in JUDGMENTS])
def test_a_bad_judgment_file_names_the_file(tmp_path, kind, write, message):
  write_triplets(tmp_path / "s", ["1", "2"])
  bad = tmp_path / "s" / "judge" / "2.npy"
  write(bad)
  with pytest.raises(ValueError) as error:
    read_2afc([tmp_path / "s"])
  assert str(error.value).startswith(f"{bad}{message}"), str(error.value)


def test_judgments_of_any_real_dtype_are_read_as_float32(tmp_path):
  write_triplets(tmp_path / "s", ["a", "b", "c"])
  for name, value in (("a", np.array([True])), ("b", np.array([[[0.25]]], np.float16)), ("c", np.uint8([0]))):
    np.save(tmp_path / "s" / "judge" / f"{name}.npy", value)
  judge = read_2afc([tmp_path / "s"]).judge
  assert judge.dtype == np.float32 and judge.tolist() == [1.0, 0.25, 0.0]


def test_a_non_square_image_names_the_file_and_equal_sizes_stack(tmp_path):
  write_triplets(tmp_path / "s", ["1", "2", "3"])
  odd = tmp_path / "s" / "p1" / "2.png"
  Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(odd)
  data = read_2afc([tmp_path / "s"])
  assert len(list(batches(data, [0, 2], 2))) == 1  # a batch without it is fine
  with pytest.raises(ValueError) as error:
    list(batches(data, [1, 0], 2))
  assert str(error.value) == (f"{odd} is not square (its shorter side resized to 64: 80x64), but the other images "
                              f"of its batch are 64x64 (e.g. {tmp_path / 's' / 'ref' / '2.png'}) and a batch stacks "
                              f"images of one size: crop it to a square, as BAPPS patches are")
  for folder in ("ref", "p0", "p1"):  # a set whose images all have one (non-square) size stacks
    for name in ("1", "2", "3"):
      Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / "s" / folder / f"{name}.png")
  (batch,) = batches(read_2afc([tmp_path / "s"]), [0, 1, 2], 3)
  assert batch["ref"].shape == batch["p1"].shape == (3, 64, 80, 3)


def test_no_sets_and_bad_batch_sizes_are_one_line_errors(tmp_path):
  with pytest.raises(ValueError, match=r"^no 2AFC sets given: at least one set folder is needed \(e\.g\. dataset/"):
    read_2afc([])
  with pytest.raises(ValueError, match=r"^no JND sets given: at least one set folder is needed"):
    read_jnd([])
  with pytest.raises(ValueError, match=r"pass a list of 2AFC set folders, e\.g\. \['dataset/2afc/val/cnn'\], not one "
                                       r"path"):
    read_2afc("dataset/2afc/val/cnn")  # not the sets 'd', 'a', 't', ...
  write_triplets(tmp_path / "s", ["1"])
  data = read_2afc([tmp_path / "s"])
  for size in (0, -1, 1.5):
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer; got {size}"):
      next(batches(data, [0], size))
  with pytest.raises(ValueError, match=r"pad_to \(2\) must be at least batch_size \(4\)"):
    next(batches(data, [0], 4, pad_to=2))


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
