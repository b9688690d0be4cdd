"""`lpips-jax eval`: score LPIPS weights on BAPPS (as the official test_dataset_model.py, JND fixed).

  lpips-jax eval                                   # released Alex v0.1 on the six 2AFC val sets
  lpips-jax eval --weights runs/alex-lin/lpips.safetensors
  lpips-jax eval --weights vgg --mode jnd          # JND mAP on val/traditional and val/cnn
  lpips-jax eval --weights squeeze --baseline      # the uncalibrated trunk (official model='baseline')

  lpips-jax eval --weights vgg --compare alex           # VGG minus Alex on the same triplets, paired bootstrap

Prints one line per set, `  Dataset [val/cnn]: 83.xx (95% CI 82.xx-84.xx)` (score in %, percentile bootstrap over
the set's examples), then the mean; with --compare, the difference of the two metrics on each set with its
paired-bootstrap interval and p-value.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lpips_jax import runner
from lpips_jax.backbones import ALIASES, NETS
from lpips_jax.errors import InputError
from lpips_jax.files import atomic_write, bombs_are_errors
from lpips_jax.layout import VERSIONS
from lpips_jax.train.config import DTYPES, TRAINABLE, VAL_2AFC, VAL_JND, flag

PROG = "lpips-jax eval"
SCORED = TRAINABLE  # the fixed metrics: E-LPIPS, random, is scored through lpips_jax.distance with a key

SETS = {"2afc": VAL_2AFC, "jnd": VAL_JND}


def parser() -> argparse.ArgumentParser:
  p = runner.Parser(prog=PROG, description=__doc__.splitlines()[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--weights", default="alex", help=f"{', '.join(map(repr, SCORED))} (released weights) or the path of "
                 "a .safetensors params file (e.g. a training run's lpips.safetensors)")
  p.add_argument("--version", default="0.1", choices=list(VERSIONS), help="for released weights")
  p.add_argument("--baseline", action="store_true", help="released trunk without heads (lpips=False)")
  p.add_argument("--mode", default="2afc", choices=sorted(SETS))
  p.add_argument("--dataroot", default="./dataset", help="BAPPS root holding 2afc/ and jnd/")
  p.add_argument("--datasets", nargs="+", help="sets under DATAROOT/MODE (default: all validation sets)")
  p.add_argument("--batch-size", type=int, default=50)
  p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="trunk compute dtype")
  p.add_argument("--compare", metavar="WEIGHTS", help="also score these weights (as --weights) on the same examples "
                 "and print the difference with its paired-bootstrap interval and p-value")
  p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples of each interval")
  p.add_argument("--json", help="also write {set: score} to this file (replaced atomically)")
  return p


def main(argv=None) -> int:
  """`lpips-jax eval`: its exit status (`lpips_jax.runner`). Ctrl-C keeps the scores printed so far (each is
  complete); --json is written only at the end."""
  return runner.run(PROG, eval_command, argv, oom_hint="lower --batch-size")


def eval_command(argv: list[str]) -> dict[str, float]:
  p = parser()
  args = p.parse_args(argv)
  for name in ("batch_size", "resamples"):
    if getattr(args, name) < 1:
      p.error(f"{flag(name)} must be at least 1, got {getattr(args, name)}")
  for name in ("weights", "compare"):
    if getattr(args, name) is not None and not getattr(args, name).strip():
      p.error(f"{flag(name)} is empty; give a net name ({', '.join(SCORED)}) or the path of a .safetensors file")
  bombs_are_errors()
  return score(args)


def score(args: argparse.Namespace) -> dict[str, float]:
  """Score the weights `args` name on each set, printing as the official test_dataset_model.py, with a 95%
  bootstrap interval of each score (and, with --compare, the paired difference of two metrics)."""
  from lpips_jax.train.data import read_2afc, read_jnd

  params = _weights(args.weights, args)
  other = _weights(args.compare, args) if args.compare else None
  read = read_2afc if args.mode == "2afc" else read_jnd
  scores = {}
  for name in args.datasets or SETS[args.mode]:
    data = read([Path(args.dataroot) / args.mode / name])
    if args.mode == "jnd" and not (np.any(data.same > 0) and np.any(data.same < 1)):
      kind = "no pair was judged the same" if not np.any(data.same > 0) else "every pair was judged the same"
      raise InputError(f"JND set {Path(args.dataroot) / args.mode / name}: {kind}, and the mAP needs pairs judged "
                       f"the same and pairs judged different; check its same/ files")
    items = _items(params, data, args, name)
    scores[name] = float(items.mean()) if args.mode == "2afc" else _jnd(items, data.same)
    print(f"  Dataset [{name}]: {100 * scores[name]:.2f} {_interval(items, data, args)}", flush=True)
    if other is not None:
      print(f"    {_difference(items, _items(other, data, args, name), data, args)}", flush=True)
  print(f"  Mean: {100 * sum(scores.values()) / len(scores):.2f}")
  if args.json:
    atomic_write(args.json, json.dumps(scores, indent=1).encode())
  return scores


def _weights(name: str, args: argparse.Namespace):
  import lpips_jax

  path = Path(name)
  if name.endswith(".safetensors") or path.is_file():
    if args.baseline:
      raise InputError("--baseline applies to released weights ('alex', 'vgg', 'squeeze'), not to a weights file")
    return lpips_jax.load(path)
  if NETS.get(ALIASES.get(name, name), NETS["alex"]).ensemble:
    raise InputError(f"{name}: E-LPIPS is random and this command scores fixed metrics; choose one of "
                     f"{list(SCORED)}")
  return lpips_jax.load(name, args.version, lpips=not args.baseline)


def _items(params, data, args, name: str):
  """Per-example values: 2AFC agreements [N] (their mean is the score), or the JND distances [N]."""
  from lpips_jax.train.evaluate import agreement_2afc, set_distances

  d = set_distances(params, data, batch_size=args.batch_size, dtype=DTYPES[args.dtype], progress=True, desc=name)
  return agreement_2afc(d[0], d[1], data.judge) if args.mode == "2afc" else d[0]


def _jnd(d, same) -> float:
  from lpips_jax.train.evaluate import score_jnd

  return score_jnd(d, same)


def _interval(items, data, args) -> str:
  """'(95% CI a-b)' of a 2AFC score (bootstrap of the mean agreement) or a JND mAP (bootstrap over pairs); '(no
  interval: ...)' for a set of one example, which has no spread to resample."""
  from lpips_jax.stats import LEAST_ITEMS, bootstrap_ci

  if len(items) < LEAST_ITEMS:
    return f"(no interval: {len(items)} {'triplet' if args.mode == '2afc' else 'pair'}; a bootstrap needs at least " \
           f"{LEAST_ITEMS})"
  if args.mode == "2afc":
    ci = bootstrap_ci(items, resamples=args.resamples)
    low, high = ci.low, ci.high
  else:
    rng = np.random.default_rng(0)
    draws = [_jnd(items[k], data.same[k]) for k in rng.integers(0, len(items), (min(args.resamples, 1000),
                                                                                len(items)))]
    low, high = np.nanquantile(draws, [0.025, 0.975])
  return f"(95% CI {100 * low:.2f}-{100 * high:.2f})"


def _difference(items, other, data, args) -> str:
  """The --compare line: weights minus compared weights, with the paired-bootstrap interval and p-value (2AFC)."""
  from lpips_jax.stats import LEAST_ITEMS, paired_bootstrap

  if args.mode != "2afc":
    return f"compared: {100 * _jnd(other, data.same):.2f} (paired intervals are computed for 2AFC only)"
  difference = 100 * float(np.mean(items - other))
  if len(items) < LEAST_ITEMS:
    return f"minus {args.compare}: {difference:+.2f} (no interval: 1 triplet; a bootstrap needs at least {LEAST_ITEMS})"
  if np.all(items - other == items[0] - other[0]):
    return f"minus {args.compare}: {difference:+.2f} on every triplet (no interval or p-value: no spread to resample)"
  diff = paired_bootstrap(items, other, resamples=args.resamples)
  return (f"minus {args.compare}: {100 * diff.difference:+.2f} (95% CI {100 * diff.low:+.2f} to "
          f"{100 * diff.high:+.2f}, p = {diff.p_value:.3g})")


if __name__ == "__main__":
  runner.exit(main())
