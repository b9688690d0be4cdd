"""The one training configuration: the official `train.py` / `lpips.Trainer` defaults (docs/official.md §3).

Run (after `scripts/download_dataset.sh` of the official repo, which leaves BAPPS in ./dataset):

  lpips-jax train --workdir runs/alex-lin                     # Alex-lin, 10 epochs, as train_test_metric.sh
  lpips-jax train --workdir runs/alex-lin --resume            # continue a killed run exactly
  lpips-jax eval --weights runs/alex-lin/lpips.safetensors

Expected: the six BAPPS 2AFC validation sets average about 69.8% for Alex-lin (paper Table 5: 73.9 / 83.4 / 71.5 /
61.2 / 65.3 / 63.2 on traditional / cnn / superres / deblur / color / frameinterp; lpips#64 reports 69.83 for a
retrain with the current code).

Each `Config` field's help text (`metadata["help"]`) is what `lpips-jax train --help` prints for its flag.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing

import jax.numpy as jnp

from lpips_jax.backbones import NETS
from lpips_jax.errors import InputError
from lpips_jax.layout import VERSIONS

# docs/official.md §3.1: frozen pretrained trunk / pretrained trunk trained / random trunk.
MODES = ("lin", "tune", "scratch")
# The trunk's compute dtype by name (None: float32); params, optimiser state and loss stay float32.
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NONNEG = ("official", "heads")  # which 1x1 kernels are projected onto >= 0 after each step
HEADS_INIT = ("random", "pretrained")
# BAPPS validation sets (official scripts/eval_valsets.sh): the six 2AFC sets and the two JND sets.
VAL_2AFC = ("val/traditional", "val/cnn", "val/superres", "val/deblur", "val/color", "val/frameinterp")
VAL_JND = ("val/traditional", "val/cnn")


def _field(default, doc: str):
  return dataclasses.field(default=default, metadata={"help": doc})


TRAINABLE = tuple(n for n in NETS if not NETS[n].ensemble)  # E-LPIPS's heads are its authors'; not trained here


@dataclasses.dataclass(frozen=True)
class Config:
  """Every setting of a training run; the defaults are the official ones unless marked otherwise."""

  net: str = _field("alex", "trunk: " + ", ".join(TRAINABLE))
  version: str = _field("0.1", "'0.1' scales the input (the released weights); '0.0' as the 2018 paper")
  mode: str = _field("lin", "lin: frozen pretrained trunk; tune: pretrained trunk trained too; scratch: random trunk")
  dataroot: str = _field("./dataset/2afc", "BAPPS 2AFC root (the official script's ./dataset + '/2afc')")
  datasets: tuple[str, ...] = _field(("train/traditional", "train/cnn", "train/mix"),
                                     "sets under DATAROOT trained on together")
  val_datasets: tuple[str, ...] = _field(VAL_2AFC, "sets under DATAROOT scored before training and after every "
                                         "epoch (not in the official train.py, which only trains); none: no scoring")
  batch_size: int = _field(50, "triplets per step")
  epochs: int = _field(5, "official nepoch, at the base learning rate (plus one: the decay starts after epoch 6)")
  epochs_decay: int = _field(5, "official nepoch_decay: lr falls by lr / epochs_decay after each later epoch")
  lr: float = _field(1e-4, "Adam's base learning rate")
  b1: float = _field(0.5, "Adam's beta1")
  b2: float = _field(0.999, "Adam's beta2")
  eps: float = _field(1e-8, "Adam's epsilon")
  dropout: bool = _field(True, "dropout p = 0.5 on the squared feature differences, training only")
  nonneg: str = _field("official", "official: the heads and every 1x1 kernel of the LPIPS module are projected onto "
                       ">= 0 after each step, i.e. also SqueezeNet's Fire squeeze/expand1x1 kernels, even in lin mode "
                       "(what lpips.Trainer.clamp_weights does at HEAD); heads: the heads only")
  heads_init: str = _field("random", "random: PyTorch's default init, as the official; pretrained: fine-tune the "
                           "released heads")
  dtype: str = _field("float32", "the trunk's compute dtype (params, optimiser state and loss stay float32); "
                      "float16 uses dynamic loss scaling")
  seed: int = _field(0, "data order, head/trunk init and dropout (the official sets no seed)")
  log_every: int = _field(100, "steps between log lines (official print_freq: 5000 triplets = 100 batches)")
  checkpoint_every: int = _field(400, "steps between checkpoints, and one at the end (official save_latest_freq: "
                                 "20000 triplets = 400 batches)")
  keep_checkpoints: int = _field(2, "checkpoints kept (the oldest are deleted)")
  eval_batch_size: int = _field(50, "validation batch size (as test_dataset_model.py)")
  workers: int = _field(4, "image-decoding threads (official nThreads)")
  prefetch: int = _field(4, "batches decoded ahead of the accelerator")


# The valid values of each field that takes one of a few; the CLI offers them as choices.
CHOICES = {"net": TRAINABLE, "version": tuple(VERSIONS), "mode": MODES, "dtype": tuple(DTYPES), "nonneg": NONNEG,
           "heads_init": HEADS_INIT}
# The settings a resumed run may change (each change is recorded in its log): how long it runs, where the data lies,
# what is scored, logged and kept, and how fast the host works. Every other setting makes the run what it is (the
# model, the optimiser, the data and its order) and must be the checkpoint's.
RESUMABLE = ("epochs", "epochs_decay", "dataroot", "val_datasets", "log_every", "checkpoint_every",
             "keep_checkpoints", "eval_batch_size", "workers", "prefetch")
SEEDS = 2 ** 32  # jax.random.PRNGKey(seed) keeps the low 32 bits: seed 2**32 would be seed 0 again


def get_config(**overrides) -> Config:
  """The reference configuration, with `overrides` (field=value) applied and checked: each bad value is
  an InputError (a ValueError) naming its flag (`--epochs-decay` for the field `epochs_decay`) and the valid range."""
  config = dataclasses.replace(Config(), **overrides)
  if config.net in NETS and NETS[config.net].ensemble:
    raise InputError(f"--net {config.net}: E-LPIPS is not trained here (its heads were trained by its authors; this "
                     f"trainer fits LPIPS heads to 2AFC judgments); choose one of {list(CHOICES['net'])}")
  for name, valid in CHOICES.items():
    if getattr(config, name) not in valid:
      raise InputError(f"unknown {flag(name)} {getattr(config, name)!r}; choose one of {list(valid)}")
  _check_numbers(config)
  if not config.datasets:
    raise InputError("--datasets names no set; give at least one set under --dataroot to train on "
                     f"(default: {' '.join(Config.datasets)})")
  if config.mode == "scratch" and config.heads_init == "pretrained":
    raise InputError("--heads-init pretrained needs the pretrained trunk; use --mode lin or tune")
  if config.dtype == "float16" and config.net == "squeeze" and config.nonneg == "official":
    # Measured: once the projection zeroes the negative 1x1 trunk weights (first step), float16 activations
    # overflow and every later loss is NaN; float32 and bfloat16 have the range.
    raise InputError("--dtype float16 cannot hold SqueezeNet's activations after the official projection clamps its "
                     "1x1 trunk convolutions to non-negative weights; use --dtype bfloat16, or --nonneg heads")
  return config


def flag(field: str) -> str:
  """A setting's command-line flag: `--epochs-decay` for the field `epochs_decay`."""
  return "--" + field.replace("_", "-")


def _check_numbers(config: Config) -> None:
  hints = typing.get_type_hints(Config)
  for field in dataclasses.fields(Config):
    value, kind = getattr(config, field.name), {int: numbers.Integral, float: numbers.Real}.get(hints[field.name])
    if kind and (isinstance(value, bool) or not isinstance(value, kind)):
      raise InputError(f"{flag(field.name)} must be {'an integer' if kind is numbers.Integral else 'a number'}, "
                       f"got {value!r}")
  for name in ("batch_size", "eval_batch_size", "log_every", "checkpoint_every", "workers", "prefetch",
               "keep_checkpoints"):
    if getattr(config, name) < 1:
      raise InputError(f"{flag(name)} must be at least 1, got {getattr(config, name)}")
  for name in ("lr", "eps"):
    if not 0 < getattr(config, name) < math.inf:  # also refuses NaN
      raise InputError(f"{flag(name)} must be a positive number, got {getattr(config, name)}")
  for name in ("b1", "b2"):  # Adam divides by 1 - beta**t
    if not 0 <= getattr(config, name) < 1:
      raise InputError(f"{flag(name)} must be in [0, 1), got {getattr(config, name)}")
  if not 0 <= config.seed < SEEDS:
    raise InputError(f"--seed must be in [0, 2**32), got {config.seed}")
  if config.epochs < 0 or config.epochs_decay < 0 or config.epochs + config.epochs_decay < 1:
    raise InputError(f"--epochs {config.epochs} --epochs-decay {config.epochs_decay}: each must be at least 0 and "
                     f"together at least 1 (epochs trained)")
