"""The LPIPS family: what each variant is for (shift sensitivity) and what it costs (speed against its reference).

1. Shift sensitivity: the distance of the official example `ex_ref.png` to itself shifted by one pixel (the two
   overlapping 63- or 64-pixel crops: right, down, diagonal), beside the distances of its two distortions
   `ex_p0.png`, `ex_p1.png`, for LPIPS and ST-LPIPS, AlexNet and VGG16.
2. Speed: `jax.jit(lpips_jax.distance)` of each ST-LPIPS net against its reference `stlpips-pytorch==0.0.2` on the
   same weights and inputs, forward (64x64 batch 50, 256x256 batch 8; vgg_st 4) and forward + gradient w.r.t. one
   image (64x64 batch 16), interleaved as bench/bench.py; ratio = reference time / lpips-jax time per repetition
   (above 1: lpips-jax faster), median and range; the plain nets' rows beside them for scale.

Run alone (nothing else computing), from the repository root, with the test extras and the reference installed
(`pip install --no-deps stlpips-pytorch==0.0.2`):
  python bench/variants.py [--reps 11] [--part shift|speed|both]
"""
import argparse
import os
import platform
import sys
from pathlib import Path

import jax
import numpy as np
from PIL import Image

import lpips_jax
from bench import import_official, inputs, interleaved, jax_call, official_model, torch_call  # bench/bench.py

IMAGES = Path(lpips_jax.__file__).parent / "images"
CASES = (("forward", 64, 50), ("forward", 256, 8), ("grad", 64, 16))


def example(name: str) -> np.ndarray:
  return (np.asarray(Image.open(IMAGES / f"{name}.png").convert("RGB"), np.float32) / 127.5 - 1)[None]


def shift_table() -> None:
  ref, p0, p1 = (example(n) for n in ("ex_ref", "ex_p0", "ex_p1"))
  print("| net | 1 px right | 1 px down | 1 px diagonal | ex_p0 | ex_p1 |")
  print("|---|---|---|---|---|---|")
  for net in ("alex", "alex_st", "vgg", "vgg_st"):
    params = lpips_jax.load(net)
    d = lambda a, b: float(lpips_jax.distance(params, a, b)[0])
    shifts = (d(ref[:, :, :-1], ref[:, :, 1:]), d(ref[:, :-1], ref[:, 1:]), d(ref[:, :-1, :-1], ref[:, 1:, 1:]))
    print(f"| {net} | " + " | ".join(f"{x:.4f}" for x in (*shifts, d(ref, p0), d(ref, p1))) + " |")


def stlpips_module():
  """stlpips_pytorch.stlpips, importable with --no-deps (its unused IPython / torchsummary imports stubbed, as
  tests/conftest.py does)."""
  import importlib.util
  import types

  import_official()  # torchvision's model code
  absent = [(n, a) for n, a in (("IPython", "embed"), ("torchsummary", "summary"))
            if n not in sys.modules and importlib.util.find_spec(n) is None]
  for name, attr in absent:
    sys.modules[name] = types.ModuleType(name)
    setattr(sys.modules[name], attr, lambda *args, **kwargs: None)
  try:
    from stlpips_pytorch import stlpips
  finally:
    for name, _ in absent:
      del sys.modules[name]
  return stlpips


def speed_table(reps: int) -> None:
  stlpips = stlpips_module()
  print("| net | case | batch | reference / lpips-jax (median, range) | lpips-jax pairs/s | reference pairs/s |")
  print("|---|---|---|---|---|---|")
  for net in ("alex", "alex_st", "vgg", "vgg_st"):
    plain = net.removesuffix("_st")
    params = lpips_jax.load(net)
    model = (stlpips.LPIPS(net=plain, variant="shift_tolerant", verbose=False).eval() if net.endswith("_st") else
             official_model(plain, params, "cpu"))
    for kind, size, batch in CASES:
      batch = 4 if (plain == "vgg" and size == 256) else batch
      a, b = inputs(batch, size)
      run, _, _ = jax_call(params, kind, a, b)
      ref = torch_call(model, kind, a, b, "cpu")
      run(), ref()  # compile / warm up
      t_ref, t_jax = interleaved(ref, run, reps)
      r = t_ref / t_jax
      print(f"| {net} | {kind} {size}x{size} | {batch} | **{np.median(r):.2f}x** ({r.min():.2f}-{r.max():.2f}) | "
            f"{batch / np.median(t_jax):.1f} | {batch / np.median(t_ref):.1f} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=int, default=11)
  parser.add_argument("--part", choices=["shift", "speed", "both"], default="both")
  args = parser.parse_args()
  print(f"# {platform.node()}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"load average {os.getloadavg()[0]:.2f}")
  if args.part in ("shift", "both"):
    shift_table()
  if args.part in ("speed", "both"):
    speed_table(args.reps)
  print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
