"""`lpips-jax train`: flags (one per `train.config.Config` field) -> `train.train.train_and_evaluate`.

  lpips-jax train --workdir runs/alex-lin [--net alex] [--mode lin|tune|scratch] [--dtype bfloat16] [--resume]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from lpips_jax import runner
from lpips_jax.files import bombs_are_errors
from lpips_jax.train.config import CHOICES, Config, flag, get_config

PROG = "lpips-jax train"
# What training needs beyond the base install (the train extra).
NEEDS = ("optax", "orbax.checkpoint", "matplotlib")


def parser() -> argparse.ArgumentParser:
  """The command's flags: --workdir, --resume, --quiet, and one per `Config` field."""
  p = runner.Parser(prog=PROG, description="Train LPIPS on 2AFC judgments (BAPPS layout); the defaults are the "
                    "official recipe. Settings: train/config.py.",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--workdir", required=True, help="where checkpoints, logs, plot and weights go; one run at a time")
  p.add_argument("--resume", action="store_true", help="continue from the latest good checkpoint in --workdir "
                 "(with the run's settings; those of train.config.RESUMABLE may change)")
  p.add_argument("--quiet", action="store_true", help="no progress lines")
  hints = typing.get_type_hints(Config)
  for field in dataclasses.fields(Config):
    name, kind, doc = flag(field.name), hints[field.name], field.metadata["help"]
    if kind is bool:
      p.add_argument(name, dest=field.name, action=argparse.BooleanOptionalAction, default=field.default, help=doc)
    elif typing.get_origin(kind) is tuple:
      p.add_argument(name, dest=field.name, nargs="*", default=field.default, metavar="SET", help=doc)
    else:
      choices = CHOICES.get(field.name)
      p.add_argument(name, dest=field.name, type=kind, default=field.default, choices=choices and list(choices),
                     help=doc)
  return p


def parse(argv=None) -> tuple[argparse.Namespace, Config]:
  """The flags and the checked `Config` they make (a bad setting is argparse's one-line error)."""
  p = parser()
  args = p.parse_args(argv)
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
  overrides.update({k: tuple(v) for k, v in overrides.items() if isinstance(v, list)})
  try:
    config = get_config(**overrides)
  except ValueError as e:
    p.error(str(e))
  return args, config


def main(argv=None) -> int:
  """`lpips-jax train`: its exit status (`lpips_jax.runner`)."""
  return runner.run(PROG, train_command, argv, oom_hint="lower --batch-size (or --eval-batch-size)")


def train_command(argv: list[str]) -> None:
  args, config = parse(argv)
  runner.require(PROG, NEEDS, "jax-lpips[train]")
  bombs_are_errors()
  from lpips_jax.train.train import train_and_evaluate  # after parsing: --help stays fast

  note = lambda line: print(f"{PROG}: note: {line}", file=sys.stderr, flush=True)
  # Ctrl-C: train_and_evaluate has finished writing its checkpoint and log, and says what the workdir holds.
  record = train_and_evaluate(config, args.workdir, resume=args.resume, progress=not args.quiet, note=note)
  if record and record.get("val_mean") is not None:
    print(f"final mean 2AFC: {100 * record['val_mean']:.2f}")


if __name__ == "__main__":
  runner.exit(main())
