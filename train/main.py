"""`lpips-jax train`: flags (one per `train.config.Config` field) -> `train.train.train_and_evaluate`.

  lpips-jax train --workdir runs/alex-lin [--net alex] [--mode lin|tune|scratch] [--dtype bfloat16] [--resume]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from lpips_jax.train.config import CHOICES, Config, get_config


def parse(argv=None) -> tuple[argparse.Namespace, Config]:
  parser = argparse.ArgumentParser(prog="lpips-jax train", description="Train LPIPS on 2AFC judgments (BAPPS layout); "
                                   "the defaults are the official recipe. Settings: train/config.py.",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--workdir", required=True, help="where checkpoints, logs, plot and weights go")
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
  parser.add_argument("--quiet", action="store_true", help="no progress lines")
  hints = typing.get_type_hints(Config)
  for field in dataclasses.fields(Config):
    flag, kind, doc = f"--{field.name}", hints[field.name], field.metadata["help"]
    if kind is bool:
      parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=doc)
    elif typing.get_origin(kind) is tuple:
      parser.add_argument(flag, nargs="*", default=field.default, metavar="SET", help=doc)
    else:
      choices = CHOICES.get(field.name)
      parser.add_argument(flag, type=kind, default=field.default, choices=choices and list(choices), help=doc)
  args = parser.parse_args(argv)
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
  overrides.update({k: tuple(v) for k, v in overrides.items() if isinstance(v, list)})
  try:
    config = get_config(**overrides)
  except ValueError as e:
    parser.error(str(e))
  return args, config


def main(argv=None) -> None:
  args, config = parse(argv)
  from lpips_jax.train.train import train_and_evaluate  # after parsing: --help stays fast

  try:  # one line for missing or mismatched data, a workdir in use, an incompatible checkpoint, a diverged run
    record = train_and_evaluate(config, args.workdir, resume=args.resume, progress=not args.quiet)
  except (OSError, ValueError, FloatingPointError) as e:
    sys.exit(f"lpips-jax train: error: {e}")
  if record and record.get("val_mean") is not None:
    print(f"final mean 2AFC: {100 * record['val_mean']:.2f}")
