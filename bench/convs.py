"""Profile: each trunk convolution alone, XLA (jax.jit) against PyTorch (oneDNN), forward and input gradient.

The convolutions are taken from the traced trunk (shapes, strides, padding), so the table covers exactly what
`lpips_jax.features` runs; times are medians of interleaved repetitions on the same random inputs.
Run: python bench/convs.py [--net alex] [--size 64] [--batch 50]     (set XLA_FLAGS to try XLA CPU options)
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

import lpips_jax
from bench import interleaved, trunk_convs  # bench/bench.py (this script's folder is on sys.path)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--net", default="alex")
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=50)
  parser.add_argument("--reps", type=int, default=7)
  args = parser.parse_args()
  params = lpips_jax.load(args.net)
  print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")
  print("| input (NHWC) | kernel | stride | forward ms jax / torch | ratio | input grad ms jax / torch | ratio |")
  print("|---|---|---|---|---|---|---|")
  totals = np.zeros(4)
  for lhs, rhs, strides, padding in trunk_convs(params, args.size, args.batch):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, lhs).astype(np.float32)
    w = rng.normal(0, 0.1, rhs).astype(np.float32)
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    forward = jax.jit(conv)
    gradient = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2)))
    jx, jw = jnp.asarray(x), jnp.asarray(w)
    tx, tw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
    pad = [p[0] for p in padding]
    assert all(p[0] == p[1] for p in padding)

    def torch_forward():
      with torch.no_grad():
        torch.nn.functional.conv2d(tx, tw, stride=strides, padding=pad)

    def torch_gradient():
      xx = tx.clone().requires_grad_(True)
      torch.sum(torch.nn.functional.conv2d(xx, tw, stride=strides, padding=pad) ** 2).backward()

    row = []
    for ours, theirs in ((lambda: jax.block_until_ready(forward(jx, jw)), torch_forward),
                         (lambda: jax.block_until_ready(gradient(jx, jw)), torch_gradient)):
      ours(), theirs()
      t_ours, t_theirs = interleaved(ours, theirs, args.reps)
      row += [1e3 * np.median(t_ours), 1e3 * np.median(t_theirs)]
    totals += row
    print(f"| {lhs} | {rhs[0]}x{rhs[1]}, {rhs[2]}->{rhs[3]} | {strides[0]} | {row[0]:.1f} / {row[1]:.1f} | "
          f"{row[1] / row[0]:.2f}x | {row[2]:.1f} / {row[3]:.1f} | {row[3] / row[2]:.2f}x |")
  print(f"| all | | | {totals[0]:.1f} / {totals[1]:.1f} | **{totals[1] / totals[0]:.2f}x** | "
        f"{totals[2]:.1f} / {totals[3]:.1f} | **{totals[3] / totals[2]:.2f}x** |")


if __name__ == "__main__":
  main()
