"""Benchmark lpips-jax against the official PyTorch lpips, in one process, interleaved; prints paired ratios.

For each case both implementations run the same weights on the same inputs, alternately, R times; the ratio is
official time / lpips-jax time per repetition (above 1: lpips-jax is faster), and the table gives its median.
lpips-jax is timed as `jax.jit(lpips_jax.distance)`, the way it runs inside a user's jitted step.
Cases: forward at 64x64 batch 50 and 256x256 batch 8 (vgg 4); forward + gradient w.r.t. one image at 64x64
batch 16 and 256x256 batch 4; first-call latency (compile + run); peak memory (separate processes); achieved FLOP/s
as a fraction of the machine's measured float32 matmul peak.

Run: python bench/bench.py [--reps 7] [--nets alex,vgg,squeeze] [--gpu]   (--gpu: both on the GPU, TF32 off and
JAX precision 'highest' for float32, plus bfloat16 rows)
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
CASES = [("forward", 64, 50), ("forward", 256, 8), ("grad", 64, 16), ("grad", 256, 4)]


def batch_for(net, kind, size, batch):
  return 4 if (net == "vgg" and kind == "forward" and size == 256) else batch


def inputs(batch, size, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  return a, np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)


def official_for(net, params, device):
  import torch
  from conftest import official_model
  from convert.convert import to_lpips_state_dict

  model = official_model(net)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in to_lpips_state_dict(params).items()})
  return model.to(device)


def torch_fn(model, kind, a, b, device):
  import torch

  ta, tb = (torch.tensor(x.transpose(0, 3, 1, 2), device=device) for x in (a, b))
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if kind == "forward":
    def run():
      with torch.no_grad():
        out = model(ta, tb)
      sync()
      return out
  else:
    def run():
      x = ta.clone().requires_grad_(True)
      model(x, tb).sum().backward()
      sync()
      return x.grad
  return run


def jax_fn(params, kind, a, b, dtype=None, precision=None):
  a, b = jax.device_put(a), jax.device_put(b)
  if kind == "forward":
    f = jax.jit(lambda p, x, y: lpips_distance(p, x, y, dtype, precision))
  else:
    f = jax.jit(jax.grad(lambda x, p, y: lpips_distance(p, x, y, dtype, precision).sum()))
  if kind == "forward":
    return lambda: f(params, a, b).block_until_ready(), f, (params, a, b)
  return lambda: f(a, params, b).block_until_ready(), f, (a, params, b)


def lpips_distance(params, a, b, dtype, precision):
  import lpips_jax

  return lpips_jax.distance(params, a, b, dtype=dtype, precision=precision)


def timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def matmul_peak(n=2048, reps=5):
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(x).block_until_ready()
  best = min(timed(lambda: f(x).block_until_ready()) for _ in range(reps))
  return 2 * n ** 3 / best


def peak_memory(side, net, kind, size, batch):
  """Peak resident memory (MB) of one call in a fresh process, above the process after imports and setup."""
  code = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / 'tests')!r})
import bench, lpips_jax
params = lpips_jax.load({net!r}); a, b = bench.inputs({batch}, {size})
if {side!r} == "torch":
  run = bench.torch_fn(bench.official_for({net!r}, params, "cpu"), {kind!r}, a, b, "cpu")
else:
  run = bench.jax_fn(params, {kind!r}, a, b)[0]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--nets", default="alex,vgg,squeeze")
  parser.add_argument("--gpu", action="store_true")
  parser.add_argument("--no-memory", action="store_true")
  args = parser.parse_args()
  import torch

  import lpips_jax

  device = "cuda" if args.gpu else "cpu"
  precision = "highest" if args.gpu else None
  if args.gpu:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
  peak = matmul_peak()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on {device} "
        f"({torch.get_num_threads()} threads); float32 matmul peak {peak / 1e9:.1f} GFLOP/s\n")
  print("| net | case | batch | official / lpips-jax (median, range) | lpips-jax pairs/s | official pairs/s | "
        "first call jax / official (s) | % of matmul peak (jax) | peak MB jax / official |")
  print("|---|---|---|---|---|---|---|---|---|")
  for net in args.nets.split(","):
    params = lpips_jax.load(net)
    model = official_for(net, params, device)
    for kind, size, batch in CASES:
      batch = batch_for(net, kind, size, batch)
      a, b = inputs(batch, size)
      t_run = torch_fn(model, kind, a, b, device)
      first_torch = timed(t_run)
      j_run, compiled, call_args = jax_fn(params, kind, a, b, precision=precision)
      first_jax = timed(j_run)
      flops = compiled.lower(*call_args).compile().cost_analysis().get("flops", float("nan"))
      ratios, tj, tt = [], [], []
      for _ in range(args.reps):
        t1, t2 = timed(t_run), timed(j_run)
        tt.append(t1)
        tj.append(t2)
        ratios.append(t1 / t2)
      mj, mt = np.median(tj), np.median(tt)
      memory = ("n/a" if args.no_memory or args.gpu else
                f"{peak_memory('jax', net, kind, size, batch):.0f} / {peak_memory('torch', net, kind, size, batch):.0f}")
      print(f"| {net} | {kind} {size}x{size} | {batch} | {np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
            f" | {batch / mj:.1f} | {batch / mt:.1f} | {first_jax:.2f} / {first_torch:.2f} | "
            f"{100 * flops / mj / peak:.0f}% | {memory} |", flush=True)
    # Cached target features: repeated distances to a fixed target, the trunk run once for the target.
    if net == "alex":
      a, b = inputs(16, 64)
      target = jax.jit(lpips_jax.features)(params, b)
      cached = jax.jit(lambda p, x, t: lpips_jax.distance_from_features(p, lpips_jax.features(p, x), t))
      plain = jax.jit(lpips_jax.distance)
      cached(params, a, target).block_until_ready()
      plain(params, a, b).block_until_ready()
      r = [timed(lambda: plain(params, a, b).block_until_ready()) /
           timed(lambda: cached(params, a, target).block_until_ready()) for _ in range(args.reps)]
      print(f"\ncached target features (alex, 64x64, batch 16): {np.median(r):.2f}x faster than recomputing them\n")


if __name__ == "__main__":
  main()
