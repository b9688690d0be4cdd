"""Why the trunks' max pools are strided maxima, not `flax.linen.max_pool` (XLA reduce_window), on CPU.

Times forward and input gradient of each pool the trunks use, both ways, on the same activations, and checks that
the values agree exactly. Run: python bench/pools.py
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lpips_jax.backbones import max_pool

# (what, input shape NHWC, window, stride, ceil mode): the first pool of each trunk at 64x64, batch 16.
POOLS = [("alex pool1", (16, 15, 15, 64), 3, 2, False), ("vgg pool1", (16, 64, 64, 64), 2, 2, False),
         ("squeeze pool1", (16, 31, 31, 64), 3, 2, True)]


def median_ms(f, *args, reps: int = 11) -> float:
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def reduce_window(x, window, stride, ceil):
  pads = "VALID"
  if ceil:
    pads = [(0, max((-(-(s - window) // stride)) * stride + window - s, 0)) for s in x.shape[1:3]]
  return nn.max_pool(x, (window, window), (stride, stride), padding=pads)


def main():
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}\n")
  print("| pool | input | reduce_window fwd / grad (ms) | strided maxima fwd / grad (ms) | speed-up fwd / grad |")
  print("|---|---|---|---|---|")
  for name, shape, window, stride, ceil in POOLS:
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32))
    times = []
    outs = []
    for pool in (lambda x: reduce_window(x, window, stride, ceil), lambda x: max_pool(x, window, stride, ceil)):
      outs.append(jax.jit(pool)(x))
      times += [median_ms(jax.jit(pool), x), median_ms(jax.jit(jax.grad(lambda x: jnp.sum(pool(x) ** 2))), x)]
    np.testing.assert_array_equal(outs[0], outs[1])
    print(f"| {name} | {shape} | {times[0]:.2f} / {times[1]:.2f} | {times[2]:.2f} / {times[3]:.2f} | "
          f"{times[0] / times[2]:.1f}x / {times[1] / times[3]:.1f}x |")


if __name__ == "__main__":
  main()
