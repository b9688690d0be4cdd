"""Benchmark one training step of lpips-jax's trainer against the official `lpips.Trainer`, interleaved.

Both sides train AlexNet-lin (pretrained trunk frozen, random heads, dropout on) on the same batch of 50 triplets
of 64x64 images: the official `Trainer.optimize_parameters()` (forward, BCE, backward, Adam, clamp) against
`train.train.make_train_step` (jitted, on all local devices). Each repetition times one step of each, alternating
which goes first; the ratio is official time / lpips-jax time (above 1: lpips-jax is faster).

Run from the repository root:  python bench/train_step.py [--net alex] [--mode lin] [--batch 50] [--reps 21]
"""
import argparse
import os
import platform

import jax
import numpy as np
import torch

from bench import import_official, interleaved, timed  # bench/bench.py (this script's folder is on sys.path)
from lpips_jax.convert.convert import to_lpips_state_dict
from lpips_jax.scoring import local_mesh
from lpips_jax.train.model import init_params
from lpips_jax.train.train import init_state, lr_schedule, make_optimizer, make_train_step


def batch_of(n: int, size: int = 64, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  ref = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
  noisy = lambda s: np.clip(ref + rng.normal(0, s, ref.shape), -1, 1).astype(np.float32)
  return {"ref": ref, "p0": noisy(0.1), "p1": noisy(0.3), "judge": rng.uniform(0, 1, n).astype(np.float32),
          "weight": np.ones(n, np.float32)}


def official_trainer(params: dict, net: str, mode: str):
  trainer = import_official().Trainer()
  trainer.initialize(model="lpips", net=net, use_gpu=False, is_train=True, pnet_rand=True, pnet_tune=mode != "lin")
  state = to_lpips_state_dict(jax.tree.map(np.asarray, params["lpips"]))
  trainer.net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
  return trainer


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--net", default="alex")
  parser.add_argument("--mode", default="lin", choices=["lin", "tune", "scratch"])
  parser.add_argument("--batch", type=int, default=50)
  parser.add_argument("--reps", type=int, default=21)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args()

  params = init_params(jax.random.PRNGKey(0), net=args.net, version="0.1", mode=args.mode)
  tx = make_optimizer(params, mode=args.mode, schedule=lr_schedule(1e-4, 1000, 5, 5))
  mesh = local_mesh()
  step = make_train_step(tx, mesh, mode=args.mode, dtype=None if args.dtype == "float32" else jax.numpy.bfloat16)
  batch = batch_of(args.batch)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  device_batch = jax.device_put(batch, sharding)
  holder = {"state": init_state(params, tx, jax.random.PRNGKey(1)), "n": 0}

  def ours():
    holder["state"], metrics = step(holder["state"], device_batch, jax.random.fold_in(jax.random.PRNGKey(2),
                                                                                      holder["n"]))
    holder["n"] += 1
    jax.block_until_ready(metrics)

  trainer = official_trainer(params, args.net, args.mode)
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  trainer.set_input({"ref": nchw(batch["ref"]), "p0": nchw(batch["p0"]), "p1": nchw(batch["p1"]),
                     "judge": torch.from_numpy(batch["judge"]).reshape(-1, 1, 1, 1)})
  theirs = trainer.optimize_parameters

  first_ours, first_theirs = timed(ours), timed(theirs)
  ours(), theirs()
  t_theirs, t_ours = interleaved(theirs, ours, args.reps)
  ratios = t_theirs / t_ours
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} on "
        f"{mesh.size} x {jax.devices()[0].device_kind}; torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {os.getloadavg()[0]:.1f}\n")
  print("| net, mode | batch | dtype | official / lpips-jax (median, range) | lpips-jax steps/s | official steps/s | "
        "first step (s) jax / official |")
  print("|---|---|---|---|---|---|---|")
  print(f"| {args.net}-{args.mode} | {args.batch} of 64x64 | {args.dtype} | **{np.median(ratios):.2f}x** "
        f"({ratios.min():.2f}-{ratios.max():.2f}) | {1 / np.median(t_ours):.2f} | {1 / np.median(t_theirs):.2f} | "
        f"{first_ours:.2f} / {first_theirs:.2f} |")


if __name__ == "__main__":
  main()
