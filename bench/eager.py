"""What the default path costs: eager `lpips_jax.distance` against the jitted call, and the one-pass trunk.

1. Eager against jitted (issue #18): `lpips_jax.distance(params, a, b)` called as is (its checks run on every
   call) against `jax.jit(lpips_jax.distance)(params, a, b)`, both on device-resident params and images, alex and
   vgg at 64x64, batch 1 and 8. The ratio is eager time / jitted time per repetition (1.00: the checks cost nothing).
2. The pair pass: `distance` runs the 2N images of N pairs through the trunk in one call (so that d(x, x) == 0 and
   d(a, b) == d(b, a) bitwise). Timed against two trunk calls (a, then b) in the same jitted function, forward and
   forward + gradient w.r.t. `a`; the ratio is one-pass time / two-call time (below 1: the one pass is faster).

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


@functools.partial(jax.jit, static_argnames="v")
def two_calls(params, a, b, v):
  """`pipeline`'s distance with the trunk called once per side (the alternative the one pass replaced)."""
  t0, t1 = (metric.trunk_taps(v, params, x, False, None, None, False) for x in (a, b))
  return metric._compare(v, params, [jnp.stack(t, axis=1) for t in zip(t0, t1)], raw=True)


def one_pass(params, a, b, v):
  return metric.pipeline(params, a, b, variant=v, spatial=False, per_layer=False, normalize=False)


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
    print("\n| one pass vs two calls | one pass ms | two calls ms | one / two [range] |\n|---|---|---|---|")
    for net in args.nets:
      params = jax.device_put(lpips_jax.load(net))
      v = check_params(params)
      for kind, batch in (("forward", 8), ("forward", 32), ("gradient", 8), ("gradient", 32)):
        a, b = images(batch)
        one, two = (one_pass, two_calls) if kind == "forward" else map(gradient_of, (one_pass, two_calls))
        f1, f2 = ready(lambda: one(params, a, b, v)), ready(lambda: two(params, a, b, v))
        f1(), f2(), f1(), f2()
        print(row(f"{net} {kind} 64x64 batch {batch}", *interleaved(f1, f2, args.reps)), flush=True)
  print(f"\n# load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
