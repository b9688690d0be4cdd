"""Training: one step equals the official trainer's; data parallel equals one device; the optimiser policy; float16
loss scaling; the log's per-example averages; the config's checks and help texts; learning end to end through
`lpips-jax train` (float32 and bfloat16); exact resume after SIGKILL."""
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lpips_jax
from lpips_jax.convert.convert import to_lpips_state_dict
from lpips_jax.train.config import get_config
from lpips_jax.train.model import init_params, init_trunk, loss_fn
from lpips_jax.train.train import (
  LOSS_SCALE_PERIOD,
  check_finite,
  freeze,
  init_state,
  lr_schedule,
  make_optimizer,
  make_train_step,
  nonneg_mask,
  train_record,
  train_step,
  trainable_labels,
)

OUTSIDE = tempfile.gettempdir()


def setup(net, mode, *, lr=1e-4, nonneg="official", seed=0):
  params = init_params(jax.random.PRNGKey(seed), net=net, version="0.1", mode=mode)
  tx = make_optimizer(params, mode=mode, schedule=lr_schedule(lr, 10, 5, 5), nonneg=nonneg)
  return params, tx, init_state(params, tx, jax.random.PRNGKey(seed + 1))


def example_batch(examples):
  """Four triplets of the official example images, with judgments 0, 1, 0.5 and 0.2."""
  r, a, b = examples["ex_ref"], examples["ex_p0"], examples["ex_p1"]
  return {"ref": np.concatenate([r, r, a, b]), "p0": np.concatenate([a, b, r, a]),
          "p1": np.concatenate([b, a, b, r]), "judge": np.float32([0, 1, .5, .2]), "weight": np.ones(4, np.float32)}


def official_trainer(official, params, mode):
  """The official `lpips.Trainer` in training mode, holding `params` (trunk, heads, ranking head), dropout off."""
  trainer = official.Trainer()
  net = lpips_jax.checks.params_variant(params["lpips"]).net
  trainer.initialize(model="lpips", net=net, use_gpu=False, is_train=True,
                     pnet_rand=True, pnet_tune=mode != "lin")
  state = to_lpips_state_dict(jax.tree.map(np.asarray, params["lpips"]))
  trainer.net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
  with torch.no_grad():
    for i, conv in enumerate(rank_convs(trainer)):
      conv.weight.copy_(torch.from_numpy(np.array(params["rank"][f"conv{i}"]["kernel"]).T[:, :, None, None].copy()))
      conv.bias.copy_(torch.from_numpy(np.array(params["rank"][f"conv{i}"]["bias"])))
  trainer.net.eval()  # dropout off (the trainer itself never calls eval)
  return trainer


def rank_convs(trainer):
  return [m for m in trainer.rankLoss.net.model if isinstance(m, torch.nn.Conv2d)]


def assert_close(ours, theirs, name, rel=1e-5):
  err = np.max(np.abs(ours - theirs))
  assert err <= rel * max(np.max(np.abs(theirs)), 1e-6), f"{name}: max error {err}, max value {np.abs(theirs).max()}"


@pytest.mark.parametrize("net,mode", [("alex", "lin"), ("vgg", "lin"), ("squeeze", "lin"), ("alex", "tune")])
def test_one_step_equals_the_official_trainer(net, mode, official, examples):
  params, tx, state = setup(net, mode)
  batch = example_batch(examples)
  loss_and_grads = jax.value_and_grad(lambda p, batch: loss_fn(freeze(p, mode), batch), has_aux=True)
  (loss, _), grads = jax.jit(loss_and_grads)(params, batch)  # one program: about half eager grad's compile
  new, metrics = jax.jit(lambda s, b: train_step(s, b, None, tx=tx, mode=mode))(state, batch)

  trainer = official_trainer(official, params, mode)
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  trainer.set_input({"ref": nchw(batch["ref"]), "p0": nchw(batch["p0"]), "p1": nchw(batch["p1"]),
                     "judge": torch.from_numpy(batch["judge"]).reshape(4, 1, 1, 1)})
  trainer.optimize_parameters()  # forward, BCE, backward, Adam step, clamp_weights

  assert abs(float(loss) - float(trainer.loss_total.detach())) <= 1e-5 and float(metrics["count"]) == 4
  assert float(metrics["loss_sum"]) / 4 == pytest.approx(float(loss), rel=1e-6)  # the step sums what loss_fn averages
  # Gradients of every parameter the official trains (heads; the trunk in tune mode), and none elsewhere.
  ours = to_lpips_state_dict(jax.tree.map(np.asarray, grads["lpips"]))
  trained = {k: p for k, p in trainer.net.named_parameters() if p.grad is not None}
  for key, p in trainer.net.named_parameters():
    if p.grad is None:
      assert not np.any(ours[key]), f"{key} is frozen in the official but has a gradient here"
    else:
      assert_close(ours[key], p.grad.numpy(), f"grad {key}")
  assert {k.split(".")[0] for k in trained} == ({"net"} if mode == "tune" else set()) | {
      f"lin{k}" for k in range(len(lpips_jax.backbones.NETS[net].channels))}
  for i, conv in enumerate(rank_convs(trainer)):
    assert_close(np.asarray(grads["rank"][f"conv{i}"]["kernel"]).T, conv.weight.grad.numpy()[:, :, 0, 0], "rank")
    assert_close(np.asarray(grads["rank"][f"conv{i}"]["bias"]), conv.bias.grad.numpy(), "rank bias")
  # After the step and the projection: every head, trunk (clamped 1x1 kernels of SqueezeNet included) and rank weight.
  before = to_lpips_state_dict(jax.tree.map(np.asarray, params["lpips"]))
  after = to_lpips_state_dict(jax.tree.map(np.asarray, new.params["lpips"]))
  theirs = {k: v.numpy() for k, v in trainer.net.state_dict().items()}
  for key in theirs:
    np.testing.assert_allclose(after[key], theirs[key], rtol=0, atol=1e-5, err_msg=key)
  heads = [k for k in theirs if k.startswith("lin")]
  assert any(np.any(before[k] < 0) for k in heads)  # random init: the projection had work to do
  for k in heads:
    assert np.all(after[k] >= 0) and np.array_equal(after[k] == 0, theirs[k] == 0), k
  trunk_changed = [k for k in theirs if k.startswith("net.") and not np.array_equal(before[k], theirs[k])]
  if mode == "tune":
    assert trunk_changed
  elif net == "squeeze":  # official clamp_weights also clamps the frozen trunk's 1x1 convs
    assert trunk_changed and all(k.endswith(("squeeze.weight", "expand1x1.weight")) for k in trunk_changed)
  else:
    assert not trunk_changed
  for i, conv in enumerate(rank_convs(trainer)):
    np.testing.assert_allclose(np.asarray(new.params["rank"][f"conv{i}"]["kernel"]).T,
                               conv.weight.detach().numpy()[:, :, 0, 0], rtol=0, atol=1e-5)


def random_batch(n, real, seed=0, size=64):
  rng = np.random.default_rng(seed)
  images = {k: rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32) for k in ("ref", "p0", "p1")}
  images["p0"] = np.clip(images["ref"] + rng.normal(0, .2, images["ref"].shape), -1, 1).astype(np.float32)
  weight = (np.arange(n) < real).astype(np.float32)
  return {**images, "judge": rng.uniform(0, 1, n).astype(np.float32) * weight, "weight": weight}


def test_data_parallel_step_equals_one_device_and_padding_is_masked():
  assert jax.device_count() == 8
  params, tx, state = setup("alex", "lin", lr=1e-2)
  batch = random_batch(16, real=13)
  rng = jax.random.PRNGKey(7)  # dropout on
  one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  results = {}
  for name, mesh, b in (("8 devices", jax.make_mesh((8,), ("data",)), batch), ("1 device", one, batch),
                        ("unpadded", one, {k: v[:13] for k, v in batch.items()})):
    fresh = jax.tree.map(jnp.array, state)  # the step donates its state
    new, metrics = make_train_step(tx, mesh, mode="lin")(fresh, b, rng)
    assert all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == mesh.size
               for x in jax.tree.leaves(new))
    results[name] = jax.device_get((new, metrics))
  reference = results["1 device"]
  for name in ("8 devices", "unpadded"):
    (new, metrics) = results[name]
    assert metrics["count"] == 13  # the padding is not counted
    for key in ("loss_sum", "acc_sum", "grad_norm"):  # the gradient's scale: Adam's first step would hide it
      np.testing.assert_allclose(metrics[key], reference[1][key], rtol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(reference[0].params)):
      # Adam's first step is lr * g / (|g| + eps): where |g| is near eps, rounding in g is amplified (lr = 1e-2).
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-3 * 1e-2, err_msg=name)
  assert not np.array_equal(reference[0].params["lpips"]["lin0"]["kernel"], state.params["lpips"]["lin0"]["kernel"])


def test_learning_rate_schedule_is_the_official_one():
  spe = 7
  schedule = lr_schedule(1e-4, spe, 5, 5)
  per_epoch = [float(schedule(e * spe + s)) for e in range(10) for s in (0, spe - 1)]
  expected = [1e-4] * 12 + [8e-5] * 2 + [6e-5] * 2 + [4e-5] * 2 + [2e-5] * 2
  np.testing.assert_allclose(per_epoch, expected, rtol=1e-6)


def test_what_is_trained_and_what_is_projected():
  params = init_params(jax.random.PRNGKey(0), net="squeeze", version="0.1", mode="lin")
  labels = {mode: trainable_labels(params, mode) for mode in ("lin", "tune", "scratch")}
  for mode, tree in labels.items():
    assert set(jax.tree.leaves(tree["lpips"]["scaling"])) == {"frozen"}  # never trained
    assert set(jax.tree.leaves(tree["rank"])) == {"train"}
    assert set(jax.tree.leaves({k: v for k, v in tree["lpips"].items() if k.startswith("lin")})) == {"train"}
    assert set(jax.tree.leaves(tree["lpips"]["squeeze"])) == {"frozen" if mode == "lin" else "train"}
  official, heads = (jax.tree.leaves(nonneg_mask(params, m)) for m in ("official", "heads"))
  assert sum(official) == 7 + 2 * 8 and sum(heads) == 7  # 7 heads; squeeze + expand1x1 of 8 Fire modules
  alex = init_params(jax.random.PRNGKey(0), net="alex", version="0.1", mode="lin")
  assert sum(jax.tree.leaves(nonneg_mask(alex, "official"))) == 5  # AlexNet has no 1x1 convolutions

  grads = jax.tree.map(jnp.ones_like, params)  # a gradient everywhere, even where the model would give none
  for nonneg in ("official", "heads"):
    tx = make_optimizer(params, mode="lin", schedule=lambda step: 1e-2, nonneg=nonneg)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam raises a float to an int32 power
      updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_array_equal(new["lpips"]["scaling"]["shift"], params["lpips"]["scaling"]["shift"])
    fire = new["lpips"]["squeeze"]["features_3"]
    old = params["lpips"]["squeeze"]["features_3"]
    np.testing.assert_array_equal(fire["expand3x3"]["kernel"], old["expand3x3"]["kernel"])
    np.testing.assert_array_equal(fire["squeeze"]["bias"], old["squeeze"]["bias"])
    if nonneg == "heads":
      np.testing.assert_array_equal(fire["squeeze"]["kernel"], old["squeeze"]["kernel"])  # frozen, untouched
    else:
      np.testing.assert_array_equal(fire["squeeze"]["kernel"], np.maximum(old["squeeze"]["kernel"], 0))
    assert all(np.all(new["lpips"][f"lin{k}"]["kernel"] >= 0) for k in range(7))


def test_scratch_trunks_follow_torchvision_init(make_official):
  for net in ("alex", "vgg", "squeeze"):
    ours = init_trunk(jax.random.PRNGKey(0), net)
    theirs = to_lpips_state_dict({net: ours})
    official = make_official(net).state_dict()
    for key in (k for k in theirs if k.startswith("net.")):
      ref = official[key].numpy()
      assert theirs[key].shape == ref.shape
      if key.endswith("bias") and net != "alex":
        assert not np.any(theirs[key]) and not np.any(ref)
      elif ref.size > 1000:
        np.testing.assert_allclose(theirs[key].std(), ref.std(), rtol=0.1, err_msg=key)
        if net != "vgg":  # uniform: the same bound
          np.testing.assert_allclose(np.abs(theirs[key]).max(), np.abs(ref).max(), rtol=0.02, err_msg=key)


def test_float16_loss_scaling_skips_overflowing_steps():
  # tune mode: the backward pass runs through the float16 trunk, where a too large loss scale overflows.
  params, tx, state = setup("alex", "tune", lr=1e-2)
  batch = random_batch(2, real=2)
  step = jax.jit(lambda s, b: train_step(s, b, None, tx=tx, mode="tune", dtype=jnp.float16))
  scaled = lambda scale, finite_steps=0: state._replace(dynamic_scale=state.dynamic_scale.replace(
      scale=jnp.float32(scale), fin_steps=jnp.int32(finite_steps)))
  assert float(init_state(params, tx, jax.random.PRNGKey(1), dtype=jnp.float16).dynamic_scale.scale) == 2 ** 15
  overflow, metrics = step(scaled(3e38), batch)
  assert not metrics["finite"] and overflow.dynamic_scale.scale == np.float32(1.5e38) and int(overflow.step) == 1
  for a, b in zip(jax.tree.leaves((overflow.params, overflow.opt_state)), jax.tree.leaves((state.params,
                                                                                           state.opt_state))):
    np.testing.assert_array_equal(a, b)  # skipped: nothing moved
  kept, _ = step(scaled(1024, LOSS_SCALE_PERIOD - 2), batch)  # the scale doubles on the PERIOD-th finite step
  assert float(kept.dynamic_scale.scale) == 1024 and int(kept.dynamic_scale.fin_steps) == LOSS_SCALE_PERIOD - 1
  grown, metrics = step(scaled(1024, LOSS_SCALE_PERIOD - 1), batch)
  assert metrics["finite"] and float(grown.dynamic_scale.scale) == 2048 and int(grown.dynamic_scale.fin_steps) == 0
  assert not np.array_equal(grown.params["lpips"]["alex"]["features_0"]["kernel"],
                            state.params["lpips"]["alex"]["features_0"]["kernel"])
  _, plain = jax.jit(lambda s, b: train_step(s, b, None, tx=tx, mode="tune"))(state, batch)
  # The gradient is unscaled: its norm is float32's, up to float16 rounding in the trunk.
  np.testing.assert_allclose(metrics["grad_norm"], plain["grad_norm"], rtol=2e-2)
  np.testing.assert_allclose(metrics["loss_sum"], plain["loss_sum"], rtol=1e-2)


def test_the_log_averages_over_examples_and_names_a_diverged_step():
  # Two full batches of 10 and a last one of 5 (a mean of per-step means would weigh its examples double).
  steps = [{"loss_sum": 10 * loss, "acc_sum": 10 * acc, "count": 10, "grad_norm": 1.0, "loss_scale": 1.0,
            "finite": True} for loss, acc in ((1.0, 0.5), (0.5, 0.7))]
  steps.append({"loss_sum": 5 * 0.1, "acc_sum": 5 * 1.0, "count": 5, "grad_norm": 4.0, "loss_scale": 2.0,
                "finite": False})
  record = train_record(steps, step=3, steps_per_epoch=3, lr=1e-4, elapsed=1.5)
  assert record["loss"] == pytest.approx((10 + 5 + 0.5) / 25) and record["acc"] == pytest.approx((5 + 7 + 5) / 25)
  assert (record["grad_norm"], record["loss_scale"], record["skipped"], record["epoch"]) == (2.0, 2.0, 1, 1.0)
  assert record["steps_per_s"] == 2.0
  check_finite(steps, 3, "float32")
  steps[1] = {**steps[1], "loss_sum": float("inf")}
  with pytest.raises(FloatingPointError, match="the training loss is inf at step 2: .* lower --lr; or --dtype bf"):
    check_finite(steps, 3, "float16")


def test_config_defaults_are_the_reference_and_bad_values_are_named():
  config = get_config()
  assert (config.lr, config.b1, config.b2, config.eps, config.batch_size) == (1e-4, 0.5, 0.999, 1e-8, 50)
  assert (config.epochs, config.epochs_decay, config.mode, config.nonneg) == (5, 5, "lin", "official")
  assert config.datasets == ("train/traditional", "train/cnn", "train/mix")
  with pytest.raises(ValueError, match=r"unknown --mode 'fine'; choose one of \['lin', 'tune', 'scratch'\]"):
    get_config(mode="fine")
  # Measured: float16 SqueezeNet overflows once the official projection has clamped its 1x1 trunk kernels.
  with pytest.raises(ValueError, match="float16.*SqueezeNet.*use --dtype bfloat16, or --nonneg heads"):
    get_config(net="squeeze", dtype="float16")
  assert get_config(net="squeeze", dtype="float16", nonneg="heads").dtype == "float16"
  with pytest.raises(ValueError, match=r"unknown --version '0.2'; choose one of \['0.0', '0.1'\]"):
    get_config(version="0.2")
  with pytest.raises(ValueError, match=r"unknown --net 'resnet'; choose one of \['alex', 'vgg', 'squeeze', "
                                       r"'alex_st', 'vgg_st'\]"):
    get_config(net="resnet")
  with pytest.raises(ValueError, match=r"--net vgg_ensemble: E-LPIPS is not trained here"):
    get_config(net="vgg_ensemble")


BAD_SETTINGS = [  # (settings, the error): every numeric flag out of its range, and no training set
    ({"lr": 0.0}, "--lr must be a positive number, got 0.0"),
    ({"lr": -1e-4}, "--lr must be a positive number, got -0.0001"),
    ({"lr": float("nan")}, "--lr must be a positive number, got nan"),
    ({"lr": float("inf")}, "--lr must be a positive number, got inf"),
    ({"eps": 0.0}, "--eps must be a positive number, got 0.0"),
    ({"b1": 1.0}, "--b1 must be in [0, 1), got 1.0"),
    ({"b2": -0.5}, "--b2 must be in [0, 1), got -0.5"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"batch_size": 2.5}, "--batch-size must be an integer, got 2.5"),
    ({"eval_batch_size": -1}, "--eval-batch-size must be at least 1, got -1"),
    ({"log_every": 0}, "--log-every must be at least 1, got 0"),
    ({"checkpoint_every": 0}, "--checkpoint-every must be at least 1, got 0"),
    ({"keep_checkpoints": 0}, "--keep-checkpoints must be at least 1, got 0"),
    ({"workers": 0}, "--workers must be at least 1, got 0"),
    ({"prefetch": 0}, "--prefetch must be at least 1, got 0"),
    ({"epochs": -1}, "--epochs -1 --epochs-decay 5: each must be at least 0 and together at least 1"),
    ({"epochs": 0, "epochs_decay": 0}, "--epochs 0 --epochs-decay 0: each must be at least 0 and together at least 1"),
    ({"seed": -1}, "--seed must be in [0, 2**32), got -1"),
    ({"seed": 2 ** 32}, "--seed must be in [0, 2**32), got 4294967296"),  # PRNGKey(2**32) is PRNGKey(0)
    ({"datasets": ()}, "--datasets names no set; give at least one set under --dataroot to train on"),
    ({"mode": "scratch", "heads_init": "pretrained"}, "--heads-init pretrained needs the pretrained trunk"),
]


@pytest.mark.parametrize("settings,error", BAD_SETTINGS, ids=[str(s) for s, _ in BAD_SETTINGS])
def test_every_bad_setting_is_refused_naming_its_flag(settings, error):
  with pytest.raises(ValueError) as caught:
    get_config(**settings)
  assert str(caught.value).startswith(error)


def test_command_line_errors_are_one_line(capsys):
  from lpips_jax.train.main import parse

  for argv, error in ((["--lr", "0"], "--lr must be a positive number, got 0.0"),
                      (["--datasets"], "--datasets names no set; give at least one set under --dataroot to train on"),
                      (["--seed", "-3"], "--seed must be in [0, 2**32), got -3"),
                      (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
                      (["--net", "resnet"], "argument --net: invalid choice: 'resnet'")):
    with pytest.raises(SystemExit) as caught:
      parse(["--workdir", "unused", *argv])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.startswith(f"lpips-jax train: error: {error}"), err
    assert err.count("\n") == 1 and err.endswith(" (see --help)\n"), err


def test_the_plot_and_the_log_are_replaced_atomically(tmp_path, monkeypatch):
  import matplotlib.figure

  from lpips_jax.train.checkpoints import truncate_log
  from lpips_jax.train.train import plot

  log = tmp_path / "log.jsonl"
  evals = [{"kind": "eval", "step": s, "val": val, "val_mean": 0.6} for s, val in
           ((0, {"val/a": 0.5}), (6, {"val/a": 0.6}), (12, {"val/b": 0.7}))]  # a resumed run scores another set
  trains = [{"kind": "train", "step": s, "loss": 1 / s} for s in range(1, 13)]
  log.write_text("".join(json.dumps(r) + "\n" for r in sorted(evals + trains, key=lambda r: r["step"])))
  plot(log, tmp_path / "training.png")
  before = (tmp_path / "training.png").read_bytes()
  assert before[:4] == b"\x89PNG"

  def torn(figure, f, **options):  # a writer that dies half-way
    f.write(b"\x89PNG half a picture")
    raise OSError("disk full")
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn)
  with pytest.raises(OSError, match="disk full"):
    plot(log, tmp_path / "training.png")
  assert (tmp_path / "training.png").read_bytes() == before  # the previous plot, whole
  monkeypatch.undo()

  # Resuming at step 10 keeps the records up to it; a last line torn by a kill is dropped.
  log.write_text(log.read_text() + '{"kind": "train", "st')
  truncate_log(log, 10)
  kept = [json.loads(line) for line in log.read_text().splitlines()]
  assert [r["step"] for r in kept] == [0, *range(1, 7), 6, *range(7, 11)]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "training.png"]  # no temporary files left
  log.write_text(log.read_text().replace('"step": 3,', '"step": 3'))  # damaged inside: a record is lost
  with pytest.raises(ValueError, match=f"^{log}, line 4, is not a JSON record; repair or delete that line"):
    truncate_log(log, 10)


def test_every_flag_says_what_it_sets_and_its_default(capsys):
  from lpips_jax.train import eval_main
  from lpips_jax.train.config import VAL_2AFC, Config
  from lpips_jax.train.main import parse

  with pytest.raises(SystemExit):
    parse(["--help"])
  text = " ".join(capsys.readouterr().out.split())
  for field in dataclasses.fields(Config):
    assert f"{' '.join(field.metadata['help'].split())} (default: {field.default})" in text, field.name
  assert Config().val_datasets == VAL_2AFC and eval_main.SETS["2afc"] == VAL_2AFC


# -- through the command ---------------------------------------------------------------------------------------------

def command(args, *, devices=1, wait=True):
  """`python -m lpips_jax.train ARGS` in a fresh process on `devices` CPU devices."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
  # Run outside the repository: there, `python -m` would import its source folder lpips_jax/, which (unlike the
  # installed package) holds no lpips_jax.train.
  process = subprocess.Popen([sys.executable, "-m", "lpips_jax.train", "--quiet", *map(str, args)], cwd=OUTSIDE,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if not wait:
    return process
  out, _ = process.communicate(timeout=600)
  assert process.returncode == 0, out[-3000:]
  return out


def records(workdir, kind):
  lines = (json.loads(line) for line in (Path(workdir) / "log.jsonl").read_text().splitlines())
  return [r for r in lines if r["kind"] == kind]


def built_once(tmp_path_factory, worker_id: str, name: str, build) -> Path:
  """The folder `name` after `build(folder)`, made once per test run: pytest-xdist's workers share it (the first to
  ask builds it under a lock; the others wait, then read it). A session fixture alone would build it once per
  worker, and a module fixture again each time a worker came back to this file after another's tests."""
  if worker_id == "master":  # no xdist: this process's own temporary folder
    folder = tmp_path_factory.mktemp(name)
    build(folder)
    return folder
  shared = tmp_path_factory.getbasetemp().parent  # the run's folder, above each worker's own
  folder = shared / name
  with open(shared / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (folder / "built").exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      build(folder)
      (folder / "built").touch()
  return folder


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory, worker_id):
  """A BAPPS-layout dataset of real photographs judged by the released Alex-lin plus noise (train/synthetic.py),
  and the teacher's distances and judgments of each set."""
  from lpips_jax.train.synthetic import build

  def make(root):
    sets = build(root, n_train=1000, n_val=300, n_jnd=20)
    np.savez(root / "sets.npz", **{f"{s}/{k}": v for s, values in sets.items() for k, v in values.items()})

  root = built_once(tmp_path_factory, worker_id, "bapps", make)
  sets = {}
  with np.load(root / "sets.npz") as saved:
    for key in saved.files:
      s, k = key.split("/")
      sets.setdefault(s, {})[k] = saved[key]
  return root, sets


def test_training_learns_the_teachers_judgments_in_float32_and_bfloat16(synthetic, tmp_path):
  from lpips_jax.train import eval_main as eval_command
  from lpips_jax.train.evaluate import score_2afc

  root, sets = synthetic
  teacher = score_2afc(**sets["val"])
  common = ["--dataroot", root / "2afc", "--datasets", "train/synthetic", "--val_datasets", "val/synthetic",
            "--epochs", 1, "--epochs_decay", 1, "--lr", 1e-2, "--log_every", 5]  # a higher lr: 40 steps, not 30k
  final = {}
  for dtype in ("float32", "bfloat16"):
    command([*common, "--workdir", tmp_path / dtype, "--dtype", dtype])
    evals = records(tmp_path / dtype, "eval")
    initial, final[dtype] = 100 * evals[0]["val_mean"], 100 * evals[-1]["val_mean"]
    print(f"{dtype}: held-out 2AFC {initial:.2f} at random init -> {final[dtype]:.2f}; teacher {100 * teacher:.2f}")
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    assert initial < 66  # a random metric: about chance (random head signs put it anywhere in ~35-65)
    assert final[dtype] >= 100 * teacher - 2
    train = records(tmp_path / dtype, "train")
    assert train[-1]["step"] == 40 and train[-1]["loss"] < train[0]["loss"]
  assert abs(final["bfloat16"] - final["float32"]) <= 1

  # The exported metric loads with lpips_jax.load and `lpips-jax eval` gives it the logged score.
  weights = tmp_path / "float32" / "lpips.safetensors"
  assert lpips_jax.checks.check_params(lpips_jax.load(weights)).net == "alex"
  scores = eval_command.eval_command(["--weights", str(weights), "--dataroot", str(root), "--datasets",
                                      "val/synthetic"])
  assert 100 * scores["val/synthetic"] == pytest.approx(final["float32"], abs=0.05)
  assert (tmp_path / "float32" / "training.png").read_bytes()[:4] == b"\x89PNG"


def first_triplets(synthetic, root, n):
  """A 2AFC set `root/small` of the first n training triplets of the synthetic data (symbolic links)."""
  small = root / "small"
  for folder in ("ref", "p0", "p1", "judge"):
    (small / folder).mkdir(parents=True)
    for path in sorted((synthetic / "2afc" / "train" / "synthetic" / folder).iterdir())[:n]:
      (small / folder / path.name).symlink_to(path)


def test_a_diverging_run_stops_with_an_error_that_names_the_step(synthetic, tmp_path):
  first_triplets(synthetic[0], tmp_path / "data", 20)
  process = command(["--dataroot", tmp_path / "data", "--datasets", "small", "--val_datasets", "--batch_size", 10,
                     "--epochs", 1, "--epochs_decay", 0, "--lr", 1e30, "--log_every", 1, "--workdir", tmp_path / "run"],
                    wait=False)
  out, _ = process.communicate(timeout=600)
  assert process.returncode == 1, out[-3000:]
  assert "lpips-jax train: error: the training loss is nan at step 2: the weights diverged" in out
  assert "Traceback" not in out


def test_a_run_killed_mid_epoch_resumes_exactly(synthetic, tmp_path):
  root, _ = synthetic
  first_triplets(root, tmp_path / "data", 60)
  args = ["--dataroot", tmp_path / "data", "--datasets", "small", "--val_datasets", "--batch_size", 10,
          "--epochs", 2, "--epochs_decay", 1, "--lr", 1e-2, "--log_every", 1, "--checkpoint_every", 5]
  command([*args, "--workdir", tmp_path / "whole"], devices=2)  # 6 steps per epoch, 18 in all

  killed = command([*args, "--workdir", tmp_path / "killed"], devices=2, wait=False)
  checkpoints = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 300
  while not (checkpoints / "5").is_dir() and killed.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert killed.returncode == -signal.SIGKILL, killed.stdout.read()[-3000:]
  assert not (tmp_path / "killed" / "lpips.safetensors").exists()
  resumed_from = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert resumed_from in (5, 10, 15)  # mid-epoch: epochs end at steps 6, 12, 18
  print(f"killed after checkpoint {resumed_from}")

  from lpips_jax.train.main import parse
  from lpips_jax.train.train import train_and_evaluate

  _, config = parse([*map(str, args), "--workdir", "unused"])
  with pytest.raises(FileExistsError, match="already holds checkpoints .* pass --resume"):
    train_and_evaluate(config, tmp_path / "killed")  # without --resume
  command([*args, "--workdir", tmp_path / "killed", "--resume"], devices=2)
  for name in ("lpips.safetensors", "rank.safetensors"):
    assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()  # bitwise
  strip = lambda rs: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rs]
  assert strip(records(tmp_path / "killed", "train")) == strip(records(tmp_path / "whole", "train"))


# -- resume, one run per work directory, Ctrl-C ------------------------------------------------------------------------

# 60 triplets in batches of 10: 6 steps per epoch, 12 in all; checkpoints at steps 5, 10 and 12.
SMALL = ["--datasets", "small", "--val_datasets", "--batch_size", 10, "--epochs", 1, "--epochs_decay", 1, "--lr", 1e-2,
         "--log_every", 1, "--checkpoint_every", 5, "--keep_checkpoints", 3]


@pytest.fixture(scope="session")
def finished(synthetic, tmp_path_factory, worker_id):
  """A finished run of SMALL (its work directory, which tests copy before changing) and the arguments that made it,
  less --workdir."""
  def make(root):
    first_triplets(synthetic[0], root / "data", 60)
    command(["--dataroot", root / "data", *SMALL, "--workdir", root / "run"])

  root = built_once(tmp_path_factory, worker_id, "finished", make)
  assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == ["10", "12", "5"]
  return root / "run", ["--dataroot", root / "data", *SMALL]


def copy_run(finished, to):
  shutil.copytree(finished, to)
  return to


def strip(rs):
  return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rs]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(finished, tmp_path):
  run, args = finished
  for damage in ("a truncated array file", "a garbled position file"):
    work = copy_run(run, tmp_path / damage.replace(" ", "-"))
    latest = work / "checkpoints" / "12"
    if damage == "a truncated array file":
      array = max((p for p in (latest / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
      os.truncate(array, array.stat().st_size // 2)
    else:
      (latest / "position" / "metadata").write_text('{"examples": 60, "steps_per_ep')
    out = command([*args, "--workdir", work, "--resume"])
    assert out.startswith(f"lpips-jax train: note: checkpoint 12 in {work} is damaged ("), out
    assert out.endswith(f"), moved to {work / 'damaged'}; resuming from checkpoint 10\n") and out.count("\n") == 1
    assert (work / "damaged" / "12").is_dir()
    for name in ("lpips.safetensors", "rank.safetensors"):  # as if nothing had happened
      assert (work / name).read_bytes() == (run / name).read_bytes(), (damage, name)
    assert strip(records(work, "train")) == strip(records(run, "train"))
    assert records(work, "resume") == [{"kind": "resume", "step": 10, "changed": {}, "damaged": [12]}]

  # No good checkpoint at all: one line naming the folder, and nothing touched.
  work = copy_run(run, tmp_path / "all-damaged")
  for step in (5, 10, 12):
    (work / "checkpoints" / str(step) / "position" / "metadata").write_text("{")
  log = (work / "log.jsonl").read_bytes()
  process = command([*args, "--workdir", work, "--resume"], wait=False)
  out, _ = process.communicate(timeout=600)
  assert process.returncode == 1 and out.count("\n") == 1, out
  assert out.startswith(f"lpips-jax train: error: no checkpoint in {work / 'checkpoints'} reads back whole (12: "
                        f"JSONDecodeError: Expecting property name enclosed in double quotes"), out
  assert out.endswith("): delete the folder to train from the start, or choose a new --workdir\n")
  assert (work / "log.jsonl").read_bytes() == log and not (work / "damaged").exists()


def test_resuming_with_other_settings_is_refused_naming_each_one(synthetic, finished, tmp_path, capsys):
  from lpips_jax.train.main import main

  run, args = finished
  work = copy_run(run, tmp_path / "run")
  base = [*map(str, args), "--workdir", str(work), "--resume", "--quiet"]
  files = lambda: {p: p.read_bytes() for p in work.rglob("*") if p.is_file() and p.name != "lock"}
  before = files()
  refused = "lpips-jax train: error: cannot resume {} (checkpoint 12): it was trained with other settings: {}; " \
            "resume with the run's settings, or train with the new ones in another --workdir"
  for flags, named in ((["--lr", "0.001", "--dtype", "bfloat16"], "--lr 0.01 (now 0.001), --dtype float32 (now "
                                                                    "bfloat16)"),
                       (["--net", "squeeze", "--version", "0.0"], "--net alex (now squeeze), --version 0.1 (now 0.0)"),
                       (["--mode", "tune"], "--mode lin (now tune)"),  # the issue's `--mode tune` traceback
                       (["--batch_size", "20", "--seed", "1", "--no-dropout"],
                        "--batch-size 10 (now 20), --dropout True (now False), --seed 0 (now 1)")):
    assert main([*base, *flags]) == 1
    assert capsys.readouterr().err == refused.format(work, named) + "\n"

  first_triplets(synthetic[0], tmp_path / "fewer", 50)  # the same set name under another --dataroot
  assert main([*base, "--dataroot", str(tmp_path / "fewer")]) == 1
  assert capsys.readouterr().err == (f"lpips-jax train: error: cannot resume {work}: its run trained on 60 examples, "
                                     f"and --datasets under --dataroot now hold 50; resume with the run's data, or "
                                     f"train on the new data in another --workdir\n")
  assert main([*base, "--epochs", "0"]) == 1
  assert capsys.readouterr().err == (f"lpips-jax train: error: cannot resume {work} at step 12: --epochs 0 "
                                     f"--epochs-decay 1 end the run at step 6; ask for at least the 2 epochs it has "
                                     f"trained\n")
  assert files() == before  # refused before anything was touched


def test_resuming_with_more_epochs_continues_and_records_the_change(finished, tmp_path):
  run, args = finished
  work = copy_run(run, tmp_path / "run")
  out = command([*args, "--workdir", work, "--resume", "--epochs", 2, "--log_every", 3])
  assert out == (f"lpips-jax train: note: resuming {work} at step 12 with changed settings: --epochs 1 -> 2, "
                 f"--log-every 1 -> 3 (recorded in log.jsonl)\n")
  assert records(work, "resume") == [{"kind": "resume", "step": 12, "changed": {"epochs": [1, 2], "log_every": [1, 3]},
                                      "damaged": []}]
  train = records(work, "train")
  assert strip(train[:12]) == strip(records(run, "train")) and [r["step"] for r in train[12:]] == [15, 18]
  assert records(work, "config") == records(run, "config")  # the run's settings as it started
  assert (work / "lpips.safetensors").read_bytes() != (run / "lpips.safetensors").read_bytes()


def test_a_second_training_in_a_busy_workdir_exits_with_one_line_and_ctrl_c_ends_the_first(synthetic, tmp_path):
  first_triplets(synthetic[0], tmp_path / "data", 20)
  args = ["--dataroot", tmp_path / "data", *SMALL, "--epochs", 500, "--checkpoint_every", 2, "--workdir",
          tmp_path / "run"]  # 2 steps per epoch, 1002 in all: still running when it is stopped
  first = command(args, wait=False)
  lock, deadline = tmp_path / "run" / "lock", time.time() + 300
  while not (lock.exists() and lock.read_text().strip() == str(first.pid)) and time.time() < deadline:
    assert first.poll() is None, first.stdout.read()[-3000:]
    time.sleep(0.01)

  second = command(args, wait=False)
  out, _ = second.communicate(timeout=300)
  assert second.returncode == 1 and out == (f"lpips-jax train: error: {tmp_path / 'run'} is in use by another "
                                            f"lpips-jax train (process {first.pid}): wait for it to end, or choose "
                                            f"another --workdir\n")
  assert first.poll() is None  # refused at once, not after the first run ended

  checkpoints = tmp_path / "run" / "checkpoints"
  while not (checkpoints / "2").is_dir() and time.time() < deadline:
    time.sleep(0.01)
  first.send_signal(signal.SIGINT)
  out, _ = first.communicate(timeout=300)
  saved = sorted(int(p.name) for p in checkpoints.iterdir())  # every folder a finished checkpoint: no temporary ones
  assert first.returncode == 130 and out == (f"lpips-jax train: interrupted; {tmp_path / 'run'} holds the "
                                             f"checkpoints up to step {saved[-1]} and their log: continue with "
                                             f"--resume\n"), out
  assert all((checkpoints / str(s) / "commit_success.txt").exists() for s in saved)
  logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
  assert logged[-1]["step"] >= saved[-1]  # every line whole (each parsed), up to the checkpoint and beyond

  epochs = saved[-1] // 2 + 1  # resumed (the lock is free again) and ended soon after the checkpoint
  command([*args, "--resume", "--epochs", epochs])
  assert records(tmp_path / "run", "train")[-1]["step"] == 2 * (epochs + 1)
