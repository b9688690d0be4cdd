"""The `lpips-jax` command: LPIPS distances between image files (after the official lpips_2imgs/2dirs/1dir scripts).

  lpips-jax REF IMG [IMG ...]   the distance of each IMG to REF
  lpips-jax DIR0 DIR1           the distances of same-named images in the two directories
  lpips-jax DIR                 the distances of all pairs of images in DIR

Every mode writes CSV (a,b,distance; any file name is quoted by the csv module and written in the bytes the file
system gives it). The directory modes write rows as they are computed, in the order of the pairs; with -o FILE
they go into FILE.partial, renamed to FILE when the run completes, and a killed or interrupted run is continued
with --resume. At the end a summary line goes to stderr: count, mean, std, median and a 95% bootstrap confidence
interval of the mean. Ctrl-C ends the command with one line and exit status 130.

Memory: a batch holds at most --batch-size pairs and at most the net's pixel budget (`BATCH_PIXELS`), so large
images go fewer to a batch.

Other jobs (`lpips-jax JOB --help` for each):
  lpips-jax convert ...         official PyTorch weights -> lpips_jax weight files (the VGG16 trunks: convert sdist,
                                convert stlpips)
  lpips-jax train ...           train LPIPS on 2AFC judgments (BAPPS layout)
  lpips-jax eval ...            2AFC / JND scores of LPIPS weights on BAPPS
  lpips-jax synthetic DIR       a small BAPPS-layout data set from scikit-image's photographs
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from lpips_jax import runner, stats
from lpips_jax.backbones import ALIASES, NETS, net_name
from lpips_jax.checks import NOT_SPATIAL, check_positive_int, check_structure
from lpips_jax.command.csvfile import CHUNK_ROWS, HEADER, csv_bytes, csv_rows, formatted_rows, one_writer, write_stdout
from lpips_jax.command.pairs import all_pair_distances, pairs_of, progress_bar, ref_distances, stream_pair_distances
from lpips_jax.errors import InputError
from lpips_jax.files import atomic_write, bombs_are_errors
from lpips_jax.layout import VERSIONS
from lpips_jax.scoring import BATCH_BYTES, BATCH_PIXELS
from lpips_jax.weights import load

# The jobs beyond distances: `lpips-jax JOB ARGS` is `python -m MODULE ARGS` (each module's main(argv), which goes
# through `lpips_jax.runner` itself).
JOBS = {"convert": "lpips_jax.convert.__main__", "train": "lpips_jax.train.main", "eval": "lpips_jax.train.eval_main",
        "synthetic": "lpips_jax.train.synthetic"}
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
OOM_HINT = "lower --batch-size, or compare fewer or smaller images at a time"
PROG = "lpips-jax"


def main(argv=None) -> int:
  """The `lpips-jax` command (or, for `lpips-jax JOB ...`, that job's): its exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in JOBS:  # a file named like a job is still reachable as ./train
    return importlib.import_module(JOBS[argv[0]]).main(argv[1:])
  return runner.run(PROG, distances_command, argv, oom_hint=OOM_HINT)


def distances_command(argv: list[str]) -> None:
  args = parser().parse_args(argv)
  bombs_are_errors()
  run(args)


def parser() -> argparse.ArgumentParser:
  budget = ", ".join(f"{net} {pixels / 1e6:.1f}" for net, pixels in BATCH_PIXELS.items())
  epilog = textwrap.fill(f"Memory: a batch holds at most --batch-size pairs and at most the net's pixel budget "
                         f"({budget} megapixels of its pairs, 2 H W per pair: about {BATCH_BYTES / 2**30:g} GiB at "
                         f"the measured peak memory per pixel), so large images go fewer to a batch; a pair above the "
                         f"budget is computed alone. REF IMG... and DIR hold all their images in memory (24 bytes per "
                         f"pixel while stacked).", 79)
  p = runner.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=epilog)
  p.add_argument("paths", nargs="+", type=Path, help="REF IMG [IMG ...], or DIR0 DIR1, or DIR")
  p.add_argument("--net", default="alex", help="alex (default), vgg, squeeze, the shift-tolerant ST-LPIPS "
                                              "alex_st, vgg_st, or E-LPIPS vgg_ensemble")
  p.add_argument("--samples", type=int, default=None, help="E-LPIPS: random transformations averaged per pair "
                                                           "(default 100)")
  p.add_argument("--seed", type=int, default=None, help="E-LPIPS: the seed of its random transformations (default "
                                                        "0); the same seed gives the same values")
  p.add_argument("--version", default="0.1", choices=list(VERSIONS))
  p.add_argument("-o", "--out", type=Path, help="write the CSV here (atomically) instead of to stdout")
  p.add_argument("--resume", action="store_true", help="continue a killed or interrupted -o run: keep the complete "
                                                        "rows of OUT.partial (or OUT) and compute only the rest")
  p.add_argument("--spatial", type=Path, metavar="OUT.png", help="with two images: also draw [a | b | heat map]")
  p.add_argument("--spatial-max", type=float, metavar="D", help="the heat map's colour scale ends at D (default: "
                                                                "the map's maximum); fix it to compare maps")
  p.add_argument("--resize", action="store_true", help="resize the second image of each pair to the first's size "
                                                        "(bilinear); without it, different sizes are an error")
  p.add_argument("--batch-size", type=int, default=32, help="at most this many pairs per batch (default 32; pairs "
                                                             "are grouped by image size), and at most the net's "
                                                             "pixel budget (below)")
  p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the trunk's compute dtype")
  p.add_argument("--max-pixels", type=int, metavar="N", help="refuse images of more than N pixels (default: "
                                                             "Pillow's decompression-bomb limit, "
                                                             f"{Image.MAX_IMAGE_PIXELS or 0:,}); raise it for "
                                                             "genuine huge images")
  return p


def run(args: argparse.Namespace) -> None:
  """The distances job: check everything the arguments say (files, outputs, extras), then load and compute."""
  ensemble = NETS[net_name(args.net)].ensemble if args.net in NETS or args.net in ALIASES else False
  if not ensemble and (args.samples is not None or args.seed is not None):
    raise InputError(f"--samples and --seed are E-LPIPS's (--net vgg_ensemble); net {args.net!r} is deterministic")
  if ensemble:
    args.samples = check_positive_int(100 if args.samples is None else args.samples, "--samples")
    args.seed = 0 if args.seed is None else args.seed
    if args.spatial:
      raise InputError(NOT_SPATIAL)
  for flag, value in (("--batch-size", args.batch_size), ("--max-pixels", args.max_pixels)):
    if value is not None:
      check_positive_int(value, flag)
  if args.spatial:
    runner.require("--spatial", ["matplotlib"], "matplotlib")
  if args.max_pixels is not None:
    Image.MAX_IMAGE_PIXELS = args.max_pixels
  pairs, mode = pairs_of(args.paths)
  if args.spatial and (mode != "ref" or len(pairs) != 1):
    raise InputError("--spatial takes exactly two image files")
  if args.spatial_max is not None and not args.spatial:
    raise InputError("--spatial-max sets the scale of the --spatial heat map; pass --spatial OUT.png too")
  if args.resume and (mode == "ref" or args.out is None):
    raise InputError("--resume continues a CSV written with -o (directory modes)")
  check_outputs(pairs, {"-o": args.out, "--spatial": args.spatial})
  with contextlib.ExitStack() as held:
    for out in filter(None, (args.out, args.spatial)):  # one command at a time writes each output
      held.enter_context(one_writer(out))
    compute(args, pairs, mode)


def compute(args: argparse.Namespace, pairs: list[tuple[Path, Path]], mode: str) -> None:
  """Load the weights, compute the pairs' distances and write them (the outputs are held)."""
  params = load(args.net, args.version)
  options = dict(resize=args.resize, batch_size=args.batch_size, batch_pixels=BATCH_PIXELS[check_structure(params).net],
                 dtype=DTYPES[args.dtype])
  if args.samples is not None:  # E-LPIPS
    options.update(key=jax.random.key(args.seed), samples=args.samples)
  if mode == "ref":
    d = ref_distances(params, pairs[0][0], [b for _, b in pairs], **options)
    text = csv_bytes([HEADER, *formatted_rows(pairs, d)])
    if args.out:
      atomic_write(args.out, text)
    else:
      write_stdout(text)
    if args.spatial:
      from lpips_jax.command.heatmap import heat_map  # matplotlib: only for --spatial

      heat_map(params, *pairs[0], args.spatial, resize=args.resize, vmax=args.spatial_max)
      runner.note(f"heat map written to {args.spatial}")
    return
  # What a resumed CSV must have been computed with: the rows of one run never mix two metrics.
  settings = {"net": check_structure(params).net, "version": args.version, "lpips": True, "dtype": args.dtype,
              "resize": args.resize, "mode": mode, "inputs": [os.fsdecode(p.resolve()) for p in args.paths]}
  if args.samples is not None:
    settings.update(samples=args.samples, seed=args.seed, batch_size=args.batch_size)
  with csv_rows(args.out, pairs, resume=args.resume, settings=settings) as (done, write):
    values = list(done)
    with progress_bar(len(pairs), True, initial=len(done)) as bar, contextlib.closing(
        all_pair_distances(params, pairs, len(done), **options) if mode == "all" else
        stream_pair_distances(params, pairs[len(done):], first=len(done), **options)) as rows:
      for _, chunk in rows:
        for k in range(0, len(chunk), CHUNK_ROWS):
          first = len(values)
          values += chunk[k:k + CHUNK_ROWS]
          write(pairs[first:len(values)], values[first:])
          bar.update(len(values) - first)
  images = len({p for pair in pairs for p in pair}) if mode == "all" else None
  sampled = (f" ({args.samples} sample{'s' if args.samples > 1 else ''}, seed {args.seed})"
             if args.samples is not None else "")
  print(f"{PROG}: {check_structure(params)}{sampled}: {summary(values, images=images)}", file=sys.stderr)


def check_outputs(pairs: list[tuple[Path, Path]], outputs: dict[str, Path | None]) -> None:
  """Refuse output paths that are input images, directories or each other: the command never overwrites its
  inputs. The same file is recognised whatever its spelling (symbolic and hard links: device and inode)."""
  inputs = {_identity(p): p for p in {p for pair in pairs for p in pair}}
  seen: dict = {}
  for flag, path in outputs.items():
    if path is None:
      continue
    if path.is_dir():
      raise InputError(f"{flag} {path} is a directory; give the name of a file to write")
    key = _identity(path)
    if key in inputs:
      raise InputError(f"{flag} {path} is the input image {inputs[key]}: it would be overwritten; write the output "
                         f"elsewhere")
    if key in seen:
      raise InputError(f"{seen[key]} and {flag} are the same file {path}; give each its own file")
    seen[key] = flag


def _identity(path: Path):
  try:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino
  except OSError:  # not there (yet): its absolute path, links resolved
    return path.resolve()


def summary(values: list[float], *, images: int | None = None) -> str:
  """One line: count, mean, std, median and the 95% bootstrap confidence interval of the mean, saying what it
  resampled. Pairs of distinct files (REF IMG..., DIR0 DIR1) are independent items and are resampled; the pairs of
  all-pairs mode (`images`: N files, values in `itertools.combinations` order) share their images, so the images
  are resampled (`lpips_jax.stats.all_pairs_bootstrap_ci`): the interval is that of "the mean distance of images
  like these", not the far narrower one of these pairs as if independent.

  The resamples are capped by their work (~1e8 drawn items: 10,000 for up to 10,000 items, 200 for 500,000; ~1e10
  products for images: 10,000 for up to 1,000 images, 200 for 7,000), so the summary of a large set takes seconds,
  not minutes; the interval's own sampling error stays small against its width.
  """
  d = np.asarray(values, np.float64)
  head = f"{len(d)} pair{'s' * (len(d) != 1)}, mean {d.mean():.6f}, std {d.std():.6f}, median {np.median(d):.6f}"
  if images is None and len(d) < stats.LEAST_ITEMS:
    return f"{head}; no confidence interval: a bootstrap needs at least {stats.LEAST_ITEMS} pairs"
  if images is not None and images < stats.LEAST_IMAGES:
    return f"{head}; no confidence interval: a bootstrap over the images needs at least {stats.LEAST_IMAGES} images"
  work = 10**8 // len(d) if images is None else 10**10 // (images * images)
  resamples = int(min(10_000, max(200, work)))
  if images is None:
    ci, unit = stats.bootstrap_ci(d, resamples=resamples), "pairs"
  else:
    ci = stats.all_pairs_bootstrap_ci(stats.pairs_matrix(d, images), resamples=resamples)
    unit = f"the {images} images"
  return (f"{head}, 95% CI of the mean [{ci.low:.6f}, {ci.high:.6f}] (bootstrap over {unit}, {resamples} "
          f"resamples)")
