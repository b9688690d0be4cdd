"""Scoring image sets from files: lpips-jax's command, pairwise and engine against the official scripts' method.

Everything starts from PNG files on disk (64x64 crops of scikit-image's photographs with mild noise; 256x256 for the
second DIR0 DIR1 case), AlexNet v0.1 (the default), float32, CPU. Sections:
  1. all pairs of 1,000 images (`lpips-jax DIR`, 499,500 pairs) against the official `lpips_1dir_allpairs.py`
     method (read both images of a pair, run the model on the pair), timed on a random sample of 2,000 pairs and
     extrapolated; lpips-jax is timed in one process, twice: the first run includes compilation, the second is the
     steady rate. Process start (importing lpips_jax and its command) is timed separately.
  2. same-named pairs (`lpips-jax DIR0 DIR1`): 2,000 pairs of 64x64 and 500 pairs of 256x256 against the official
     `lpips_2dirs.py` method (one pair at a time, decoding included); for lpips-jax, the fraction of the wall time
     the engine waited for decoded images.
  3. `lpips_jax.pairwise` on 10,000 64x64 images (arrays in memory): pairs/s and the process's peak resident memory,
     in a fresh process.
  4. the engine (`score_pairs`) on 1 against 2 CPU devices (`--xla_force_host_platform_device_count`), fresh processes.
The official and lpips-jax runs of one case follow each other in the same process and use the same weights.

Run alone on a quiet machine (check `uptime` before and after): python bench/evaluate.py [--quick]
"""
import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def photo_crops(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
  """n uint8 [size, size, 3] crops of scikit-image's bundled photographs, each with mild noise."""
  import skimage.data

  photos = [np.asarray(getattr(skimage.data, name)())[..., :3] for name in ("astronaut", "coffee", "chelsea",
                                                                           "rocket")]
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    photo = photos[i % len(photos)]
    y, x = rng.integers(0, photo.shape[0] - size + 1), rng.integers(0, photo.shape[1] - size + 1)
    crop = photo[y:y + size, x:x + size].astype(np.float64) + rng.normal(0, 4, (size, size, 3))
    out.append(np.clip(crop, 0, 255).astype(np.uint8))
  return out


def write_dir(directory: Path, images: list[np.ndarray]) -> list[Path]:
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, image in enumerate(images):
    paths.append(directory / f"{i:05d}.png")
    Image.fromarray(image).save(paths[-1], compress_level=1)
  return paths


def official_model():
  """The official lpips==0.1.4 AlexNet v0.1 holding lpips-jax's pretrained weights (the official has no offline
  pretrained trunk here)."""
  import torch

  sys.path.insert(0, str(HERE))
  import lpips_jax
  from bench import official_model as build  # noqa: E402

  torch.set_grad_enabled(False)
  return build("alex", lpips_jax.load("alex"), "cpu")


def official_pair(model, a: Path, b: Path) -> float:
  """What the official scripts do for one pair: load both images (`lpips.im2tensor(lpips.load_image(...))`, here
  with Pillow, as lpips.load_image needs OpenCV), run the model."""
  import torch

  x, y = (torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)
          for p in (a, b))
  return float(model(x, y))


def time_official(model, pairs: list[tuple[Path, Path]]) -> float:
  """Pairs per second of the official method over `pairs` (after one warm-up pair)."""
  official_pair(model, *pairs[0])
  start = time.perf_counter()
  for a, b in pairs:
    official_pair(model, a, b)
  return len(pairs) / (time.perf_counter() - start)


def time_command(args: list[str]) -> tuple[float, float]:
  """(first, second) wall seconds of `lpips-jax ARGS` run twice in this process (the first compiles)."""
  from lpips_jax import command as cli

  times = []
  for _ in range(2):
    start = time.perf_counter()
    assert cli.main(args) == 0
    times.append(time.perf_counter() - start)
  return times[0], times[1]


def process_start() -> float:
  """Seconds to start Python and import the command (what every run of `lpips-jax` pays before its work)."""
  start = time.perf_counter()
  subprocess.run([sys.executable, "-c", "import lpips_jax.command"], check=True)
  return time.perf_counter() - start


def all_pairs(root: Path, n: int, sample: int, model) -> dict:
  paths = write_dir(root / "all", photo_crops(n, 64))
  pairs = n * (n - 1) // 2
  rng = np.random.default_rng(1)
  chosen = [tuple(rng.choice(n, 2, replace=False)) for _ in range(sample)]
  official = time_official(model, [(paths[i], paths[j]) for i, j in chosen])
  first, second = time_command([str(root / "all"), "-o", str(root / "all.csv")])
  with open(root / "all.csv") as f:
    assert sum(1 for _ in csv.reader(f)) == pairs + 1
  return {"images": n, "pairs": pairs, "official_pairs_per_s": official, "official_extrapolated_s": pairs / official,
          "jax_first_run_s": first, "jax_steady_s": second, "jax_steady_pairs_per_s": pairs / second,
          "ratio_steady": pairs / second / official, "ratio_first_run": pairs / first / official}


def same_named(root: Path, n: int, size: int, model) -> dict:
  a = write_dir(root / f"a{size}", photo_crops(n, size, seed=2))
  b = write_dir(root / f"b{size}", photo_crops(n, size, seed=3))
  official = time_official(model, list(zip(a, b)))
  waits = measure_decoding_wait([str(root / f"a{size}"), str(root / f"b{size}"), "-o", str(root / f"d{size}.csv")])
  first, second = time_command([str(root / f"a{size}"), str(root / f"b{size}"), "-o", str(root / f"d{size}.csv")])
  return {"pairs": n, "size": size, "official_pairs_per_s": official, "jax_first_run_s": first,
          "jax_steady_pairs_per_s": n / second, "ratio_steady": n / second / official,
          "ratio_first_run": n / first / official, **waits}


def measure_decoding_wait(args: list[str]) -> dict:
  """The fraction of a (compiled) run's wall time the engine spent waiting for the next decoded batch."""
  from lpips_jax import command as cli
  from lpips_jax.command import pairs

  cli.main(args)  # compile first: waiting during compilation is not waiting for decoding
  real = pairs.prefetch
  waited = [0.0]

  def timed(iterable, size):
    stream = real(iterable, size)
    while True:
      start = time.perf_counter()
      item = next(stream, None)
      waited[0] += time.perf_counter() - start
      if item is None:
        return
      yield item

  pairs.prefetch = timed
  try:
    start = time.perf_counter()
    cli.main(args)
    wall = time.perf_counter() - start
  finally:
    pairs.prefetch = real
  return {"decode_wait_s": waited[0], "decode_wait_fraction": waited[0] / wall}


def pairwise_memory(n: int) -> dict:
  """pairwise on n 64x64 images in a fresh process: seconds, pairs/s and peak RSS."""
  code = f"""
import json, resource, time
import numpy as np
import lpips_jax
from lpips_jax.all_pairs import pairwise
params = lpips_jax.load("alex")
x = np.random.default_rng(0).uniform(-1, 1, ({n}, 64, 64, 3)).astype(np.float32)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pairwise(params, x[:300])
start = time.perf_counter()
d = pairwise(params, x)
elapsed = time.perf_counter() - start
print(json.dumps({{"images": {n}, "seconds": elapsed, "pairs_per_s": {n} * ({n} - 1) / 2 / elapsed,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "inputs_mb": x.nbytes / 2**20, "result_mb": d.nbytes / 2**20}}))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def engine_devices(devices: int, n: int) -> dict:
  code = f"""
import json, time
import numpy as np
import jax, lpips_jax
params = lpips_jax.load("alex")
rng = np.random.default_rng(0)
a = rng.uniform(-1, 1, ({n}, 64, 64, 3)).astype(np.float32)
b = np.clip(a + rng.normal(0, 0.2, a.shape), -1, 1).astype(np.float32)
lpips_jax.score_pairs(params, a[:64], b[:64], batch_size=64)
start = time.perf_counter()
lpips_jax.score_pairs(params, a, b, batch_size=64)
print(json.dumps({{"devices": jax.device_count(), "pairs_per_s": {n} / (time.perf_counter() - start)}}))
"""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes (a check that the script runs)")
  args = parser.parse_args()
  scale = 10 if args.quick else 1
  print(f"load average before: {os.getloadavg()}", flush=True)
  results = {"process_start_s": process_start()}
  model = official_model()
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    results["all_pairs"] = all_pairs(root, 1000 // scale, 2000 // scale, model)
    print(json.dumps(results["all_pairs"]), flush=True)
    results["dirs_64"] = same_named(root, 2000 // scale, 64, model)
    print(json.dumps(results["dirs_64"]), flush=True)
    results["dirs_256"] = same_named(root, 500 // scale, 256, model)
    print(json.dumps(results["dirs_256"]), flush=True)
  results["pairwise"] = pairwise_memory(10_000 // scale)
  print(json.dumps(results["pairwise"]), flush=True)
  results["engine"] = [engine_devices(d, 1024 // scale) for d in (1, 2)]
  print(json.dumps(results["engine"]), flush=True)
  results["load_average_after"] = os.getloadavg()
  results["peak_rss_mb_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
