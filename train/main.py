"""`lpips-jax train`: flags (one per `train.config.Config` field) -> `train.train.train_and_evaluate`.

  lpips-jax train --workdir runs/alex-lin [--net alex] [--mode lin|tune|scratch] [--dtype bfloat16] [--resume]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from lpips_jax.files import bombs_are_errors
from lpips_jax.train.config import CHOICES, Config, get_config


class Parser(argparse.ArgumentParser):
  """argparse whose errors are one line (the usage is what --help prints)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def exit_interrupted(line: str) -> typing.NoReturn:
  """End the process after Ctrl-C with `line` and status 130 (128 + SIGINT), once its files are closed.

  os._exit, not sys.exit: measured, an XLA compilation cut short by Ctrl-C can crash the interpreter's shutdown
  (SIGSEGV after the line is printed), and by now there is nothing left to flush but stdout and stderr.
  """
  print(line, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(130)


def parse(argv=None) -> tuple[argparse.Namespace, Config]:
  parser = Parser(prog="lpips-jax train", description="Train LPIPS on 2AFC judgments (BAPPS layout); the defaults "
                  "are the official recipe. Settings: train/config.py.",
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--workdir", required=True, help="where checkpoints, logs, plot and weights go; one run at a "
                      "time")
  parser.add_argument("--resume", action="store_true", help="continue from the latest good checkpoint in --workdir "
                      "(with the run's settings; those of train.config.RESUMABLE may change)")
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
  bombs_are_errors()
  note = lambda line: print(f"lpips-jax train: note: {line}", file=sys.stderr, flush=True)
  try:  # one line for missing or mismatched data, a workdir in use, an incompatible checkpoint, a diverged run
    from lpips_jax.train.train import train_and_evaluate  # after parsing: --help stays fast

    record = train_and_evaluate(config, args.workdir, resume=args.resume, progress=not args.quiet, note=note)
  except (OSError, ValueError, FloatingPointError) as e:
    sys.exit(f"lpips-jax train: error: {' '.join(str(e).split())}")
  except KeyboardInterrupt as e:  # Ctrl-C; train_and_evaluate has finished writing its checkpoint and log
    exit_interrupted(f"lpips-jax train: {str(e) or 'interrupted'}")
  if record and record.get("val_mean") is not None:
    print(f"final mean 2AFC: {100 * record['val_mean']:.2f}")
