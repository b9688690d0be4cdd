"""Benchmark lpips-jax against the official PyTorch lpips 0.1.4, in one process, interleaved; prints paired ratios.

Both sides run the same weights (lpips-jax's pretrained params, loaded into the official module) on the same inputs.
Each repetition times one call of each, alternating which goes first; the ratio is official time / lpips-jax time
for that repetition (above 1: lpips-jax is faster) and the table gives the median and the range over repetitions.
lpips-jax is timed as `jax.jit(lpips_jax.distance)`, the way it runs inside a user's jitted step (the batch sharded
over all JAX devices); the official as `model(a, b)` under `torch.no_grad()` (forward) or with `.backward()` to the
first image (gradient).

Cases: forward at 64x64 batch 50 and 256x256 batch 8 (vgg 4); forward + gradient w.r.t. one image (the loss use) at
64x64 batch 16 and 256x256 batch 4. Per case: pairs/s, first-call latency (lpips-jax: trace + compile + run;
official: first run), peak memory of one call in a fresh process (resident-set high-water mark above the process
before the call; lpips-jax compiled beforehand), and the fraction of the machine's measured float32 matmul peak
reached (model FLOPs counted from the convolution shapes: 2 trunk passes per pair forward, 3 with the gradient).
Then the speed-up of cached target features (the loss against a fixed target) and the memory saved by `remat`.

Run (from the repository root; needs the test extras and the official package, see README):
  python bench/bench.py                    # CPU, float32, everything (about 15 minutes on 2 cores)
  python bench/bench.py --nets alex --reps 5
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/bench.py   # two CPU devices, batch sharded
  python bench/bench.py --gpu              # both on the GPU: TF32 off and JAX precision 'highest' for float32,
                                           # plus bfloat16 rows (JAX dtype=bfloat16, torch autocast)
The script sets no XLA flags itself: whatever XLA_FLAGS the environment holds applies (and is printed).
"""
import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import time
import types
import warnings

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

import lpips_jax

CASES = [("forward", 64, 50), ("forward", 256, 8), ("grad", 64, 16), ("grad", 256, 4)]


def import_official():
  """The official lpips==0.1.4 on a CPU-only torch: torchvision's package __init__ (compiled ops) is bypassed."""
  import torch  # noqa: F401

  if "torchvision" not in sys.modules:
    package = types.ModuleType("torchvision")
    package.__path__ = list(importlib.util.find_spec("torchvision").submodule_search_locations)
    sys.modules["torchvision"] = package
  import lpips
  import torchvision.models  # noqa: F401

  return lpips


def official_model(net: str, params, device: str):
  """An official `lpips.LPIPS` (eval mode) holding exactly `params` (trunk, heads)."""
  import torch

  from lpips_jax.convert.convert import to_lpips_state_dict

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation
    model = import_official().LPIPS(net=net, pnet_rand=True, verbose=False).eval()
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_lpips_state_dict(params).items()})
  return model.to(device)


def batch_for(net: str, kind: str, size: int, batch: int) -> int:
  return 4 if (net == "vgg" and kind == "forward" and size == 256) else batch


def inputs(batch: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A batch of random images and noisy copies, float32 NHWC in [-1, 1]."""
  rng = np.random.default_rng(seed)
  a = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  return a, np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)


def trunk_convs(params, size: int, batch: int = 1) -> list[tuple]:
  """(input shape NHWC, kernel shape HWIO, strides, padding) of every convolution of the trunk, in order, read off
  the traced `lpips_jax.features`."""
  jaxpr = jax.make_jaxpr(lambda x: lpips_jax.features(params, x))(
      jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        found.append((eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.params["window_strides"],
                      eqn.params["padding"]))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return found


def trunk_flops(params, size: int) -> int:
  """FLOPs of one image's trunk pass, 2 * MACs of every convolution, counted from the layer shapes."""
  return sum(2 * int(np.prod(lhs[:1])) * _out_pixels(lhs, rhs, strides, padding) * int(np.prod(rhs))
             for lhs, rhs, strides, padding in trunk_convs(params, size))


def _out_pixels(lhs, rhs, strides, padding) -> int:
  return int(np.prod([(n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(lhs[1:3], rhs[:2], strides, padding)]))


def torch_call(model, kind: str, a: np.ndarray, b: np.ndarray, device: str, bf16: bool = False):
  """A function that runs one official forward (or forward + backward to `a`) and waits for it."""
  import contextlib

  import torch

  ta, tb = (torch.tensor(x.transpose(0, 3, 1, 2), device=device) for x in (a, b))
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  cast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

  def forward():
    with torch.no_grad(), cast():
      out = model(ta, tb)
    sync()
    return out

  def gradient():
    x = ta.clone().requires_grad_(True)
    with cast():
      loss = model(x, tb).sum()
    loss.backward()
    sync()
    return x.grad

  return forward if kind == "forward" else gradient


def jax_call(params, kind: str, a: np.ndarray, b: np.ndarray, dtype=None, precision=None, remat=False):
  """(run, jitted function, its arguments): `run` calls the jitted distance (or its input gradient) and waits.

  With several devices the batch is sharded over all of them and the params replicated, as `score_pairs` and a
  data-parallel training step do (on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N).
  """
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  a, b = jax.device_put(a, data), jax.device_put(b, data)
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  distance = lambda p, x, y: lpips_jax.distance(p, x, y, dtype=dtype, precision=precision, remat=remat)
  if kind == "forward":
    f, args = jax.jit(distance), (params, a, b)
  else:
    f, args = jax.jit(jax.grad(lambda x, p, y: distance(p, x, y).sum())), (a, params, b)
  return (lambda: jax.block_until_ready(f(*args))), f, args


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved(fn_a, fn_b, reps: int) -> tuple[np.ndarray, np.ndarray]:
  """Times of `fn_a` and `fn_b`, one call each per repetition, alternating which runs first."""
  ta, tb = [], []
  for r in range(reps):
    if r % 2:
      tb.append(timed(fn_b))
      ta.append(timed(fn_a))
    else:
      ta.append(timed(fn_a))
      tb.append(timed(fn_b))
  return np.array(ta), np.array(tb)


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
  """The machine's float32 matmul FLOP/s: the best of `reps` 2048^2 products, JAX or torch, whichever is faster."""
  import torch

  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(x).block_until_ready()
  t = torch.ones(n, n)
  t @ t
  best = min(min(timed(lambda: f(x).block_until_ready()), timed(lambda: t @ t)) for _ in range(reps))
  return 2 * n ** 3 / best


def _status_kb(key: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(key))


def memory_of_one_call(side: str, net: str, kind: str, size: int, batch: int, remat: bool = False) -> float:
  """(Run in a fresh process) MB by which one call raises the resident-set high-water mark (Linux)."""
  params = lpips_jax.load(net)
  a, b = inputs(batch, size)
  if side == "official":
    import torch  # noqa: F401

    run = torch_call(official_model(net, params, "cpu"), kind, a, b, "cpu")
  else:
    _, f, args = jax_call(params, kind, a, b, remat=remat)
    compiled = f.lower(*args).compile()
    run = lambda: jax.block_until_ready(compiled(*args))
  before = _status_kb("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current resident set
  run()
  return (_status_kb("VmHWM") - before) / 1024


def peak_memory(side: str, net: str, kind: str, size: int, batch: int, remat: bool = False) -> float:
  out = subprocess.run([sys.executable, __file__, "--memory-of", side, net, kind, str(size), str(batch),
                        str(int(remat))],
                       capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
  try:
    return float(out.stdout.strip().splitlines()[-1])
  except (IndexError, ValueError):
    return float("nan")


def case_rows(net, params, model, device, args, peak, dtype=None, precision=None, bf16=False):
  """One table row per case for `net`, as Markdown."""
  per_image = {size: trunk_flops(params, size) for size in (64, 256)}
  label = "bfloat16" if bf16 else "float32"
  for kind, size, batch in CASES:
    batch = batch_for(net, kind, size, batch)
    a, b = inputs(batch, size)
    t_run = torch_call(model, kind, a, b, device, bf16)
    first_official = timed(t_run)
    j_run, _, _ = jax_call(params, kind, a, b, dtype, precision)
    first_jax = timed(j_run)
    t_run(), j_run()  # both warm
    tt, tj = interleaved(t_run, j_run, args.reps)
    ratios = tt / tj
    flops = batch * per_image[size] * (2 if kind == "forward" else 3)
    memory = "n/a"
    if device == "cpu" and not args.no_memory:
      memory = " / ".join(f"{peak_memory(s, net, kind, size, batch):.0f}" for s in ("jax", "official"))
    name = f"{kind} {size}x{size}"
    print(f"| {net} | {name} | {label} | {batch} | **{np.median(ratios):.2f}x** "
          f"({ratios.min():.2f}-{ratios.max():.2f}) "
          f"| {batch / np.median(tj):.1f} | {batch / np.median(tt):.1f} | {first_jax:.2f} / {first_official:.2f} | "
          f"{100 * flops / np.median(tj) / peak:.0f}% / {100 * flops / np.median(tt) / peak:.0f}% | {memory} |",
          flush=True)


def cached_target_rows(nets, reps):
  """Speed-up of computing a fixed target's features once (`features` + `distance_from_features`)."""
  print("\n| net | use (64x64, batch 16) | plain distance (ms) | cached target (ms) | speed-up (median, range) |")
  print("|---|---|---|---|---|")
  for net in nets:
    params = lpips_jax.load(net)
    a, b = (jnp.asarray(x) for x in inputs(16, 64))
    target = jax.block_until_ready(jax.jit(lpips_jax.features)(params, b))
    plain = lambda p, x, y: lpips_jax.distance(p, x, y)
    cached = lambda p, x, t: lpips_jax.distance_from_features(p, lpips_jax.features(p, x), t)
    for use, wrap in (("forward", lambda f: f), ("loss gradient", lambda f: jax.grad(lambda p, x, y: f(p, x, y).sum(),
                                                                                     argnums=1))):
      f_plain, f_cached = jax.jit(wrap(plain)), jax.jit(wrap(cached))
      run_plain = lambda: jax.block_until_ready(f_plain(params, a, b))
      run_cached = lambda: jax.block_until_ready(f_cached(params, a, target))
      run_plain(), run_cached()
      tp, tc = interleaved(run_plain, run_cached, reps)
      r = tp / tc
      print(f"| {net} | {use} | {1e3 * np.median(tp):.1f} | {1e3 * np.median(tc):.1f} | "
            f"{np.median(r):.2f}x ({r.min():.2f}-{r.max():.2f}) |", flush=True)


def remat_rows(nets, size=256, batch=4, memory=True):
  """What the input gradient keeps with and without `remat`: the arrays JAX saves for the backward pass (the leaves of
  the `jax.vjp` function, weights included), XLA's buffer assignment for the whole gradient (temporaries), and the
  peak memory of one call in a fresh process (as in the main table), in MB."""
  print(f"\n| net | gradient {size}x{size}, batch {batch} | saved for the backward pass (MB) without / with remat | "
        "XLA temporaries (MB) without / with | peak MB without / with |")
  print("|---|---|---|---|---|")
  for net in nets:
    params = lpips_jax.load(net)
    a, b = (jnp.asarray(x) for x in inputs(batch, size))
    saved, temp, peak = [], [], []
    for remat in (False, True):
      loss = lambda x, p, y: lpips_jax.distance(p, x, y, remat=remat).sum()
      _, backward = jax.vjp(lambda x: loss(x, params, b), a)
      saved.append(sum(leaf.nbytes for leaf in jax.tree.leaves(backward)) / 2 ** 20)
      f = jax.jit(jax.grad(loss))
      temp.append(f.lower(a, params, b).compile().memory_analysis().temp_size_in_bytes / 2 ** 20)
      peak.append(peak_memory("jax", net, "grad", size, batch, remat) if memory else float("nan"))
    print(f"| {net} | input gradient | {saved[0]:.0f} / {saved[1]:.0f} | {temp[0]:.0f} / {temp[1]:.0f} | "
          f"{peak[0]:.0f} / {peak[1]:.0f} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=11, help="interleaved repetitions per case (default 11)")
  parser.add_argument("--nets", default="alex,vgg,squeeze")
  parser.add_argument("--gpu", action="store_true", help="run both on the GPU (float32 and bfloat16 rows)")
  parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
  parser.add_argument("--memory-of", nargs=6, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.memory_of:
    side, net, kind, size, batch, remat = args.memory_of
    print(memory_of_one_call(side, net, kind, int(size), int(batch), remat == "1"))
    return
  import torch

  nets = args.nets.split(",")
  device = "cuda" if args.gpu else "cpu"
  if args.gpu:  # float32 parity settings on both sides (docs/official.md §1.5): no TF32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
  peak = matmul_peak()
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} on "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}; torch {torch.__version__} on {device} with "
        f"{torch.get_num_threads()} "
        f"threads (its default); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"load average at start {os.getloadavg()[0]:.1f}; float32 matmul peak {peak / 1e9:.0f} GFLOP/s\n")
  print("| net | case | dtype | batch | official / lpips-jax (median, range) | lpips-jax pairs/s | official pairs/s | "
        "first call (s) jax / official | % of matmul peak jax / official | peak MB jax / official |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for net in nets:
    params = lpips_jax.load(net)
    model = official_model(net, params, device)
    case_rows(net, params, model, device, args, peak, precision="highest" if args.gpu else None)
    if args.gpu:
      case_rows(net, params, model, device, args, peak, dtype=jnp.bfloat16, bf16=True)
  cached_target_rows(nets, args.reps)
  remat_rows(nets, memory=not args.no_memory)
  print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
