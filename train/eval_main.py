"""`lpips-jax eval`: score LPIPS weights on BAPPS (as the official test_dataset_model.py, JND fixed).

  lpips-jax eval                                   # released Alex v0.1 on the six 2AFC val sets
  lpips-jax eval --weights runs/alex-lin/lpips.safetensors
  lpips-jax eval --weights vgg --mode jnd          # JND mAP on val/traditional and val/cnn
  lpips-jax eval --weights squeeze --baseline      # the uncalibrated trunk (official model='baseline')

Prints one line per set, `  Dataset [val/cnn]: 83.xx` (score in %), then the mean.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lpips_jax.backbones import NETS
from lpips_jax.lpips import VERSIONS
from lpips_jax.train.config import DTYPES, VAL_2AFC, VAL_JND

SETS = {"2afc": VAL_2AFC, "jnd": VAL_JND}


def parse(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="lpips-jax eval", description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--weights", default="alex", help=f"{', '.join(map(repr, NETS))} (released weights) or the "
                      "path of a .safetensors params file (e.g. a training run's lpips.safetensors)")
  parser.add_argument("--version", default="0.1", choices=list(VERSIONS), help="for released weights")
  parser.add_argument("--baseline", action="store_true", help="released trunk without heads (lpips=False)")
  parser.add_argument("--mode", default="2afc", choices=sorted(SETS))
  parser.add_argument("--dataroot", default="./dataset", help="BAPPS root holding 2afc/ and jnd/")
  parser.add_argument("--datasets", nargs="+", help="sets under DATAROOT/MODE (default: all validation sets)")
  parser.add_argument("--batch_size", type=int, default=50)
  parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                      help="trunk compute dtype")
  parser.add_argument("--json", help="also write {set: score} to this file")
  return parser.parse_args(argv)


def main(argv=None) -> dict[str, float]:
  args = parse(argv)
  try:  # one line for a missing weights file or data folder, mismatched folders, a corrupt file
    return score(args)
  except (OSError, ValueError) as e:
    sys.exit(f"lpips-jax eval: error: {e}")


def score(args: argparse.Namespace) -> dict[str, float]:
  """Score the weights `args` name on each set, printing as the official test_dataset_model.py."""
  import lpips_jax
  from lpips_jax.train.data import read_2afc, read_jnd
  from lpips_jax.train.evaluate import evaluate_2afc, evaluate_jnd

  path = Path(args.weights)
  if args.weights.endswith(".safetensors") or path.is_file():
    if args.baseline:
      sys.exit("--baseline applies to released weights ('alex', 'vgg', 'squeeze'), not to a weights file")
    params = lpips_jax.load(path)
  else:
    params = lpips_jax.load(args.weights, args.version, lpips=not args.baseline)
  dtype = DTYPES[args.dtype]
  read, evaluate = (read_2afc, evaluate_2afc) if args.mode == "2afc" else (read_jnd, evaluate_jnd)
  scores = {}
  for name in args.datasets or SETS[args.mode]:
    data = read([Path(args.dataroot) / args.mode / name])
    scores[name] = evaluate(params, data, batch_size=args.batch_size, dtype=dtype, progress=True, desc=name)[0]
    print(f"  Dataset [{name}]: {100 * scores[name]:.2f}", flush=True)
  print(f"  Mean: {100 * sum(scores.values()) / len(scores):.2f}")
  if args.json:
    Path(args.json).write_text(json.dumps(scores, indent=1))
  return scores


if __name__ == "__main__":
  main()
