"""Print the README's parity table: largest error against the official lpips==0.1.4, per net and option.

Same cases as tests/test_parity.py (random torchvision-initialised trunks + official heads, versions 0.0 and 0.1,
sizes 64x64, 65x97, 100x128; float32 on CPU), plus the example images with the pretrained trunks.
Run: python bench/parity_table.py   (needs the test extras and the official package; see README)
"""
import sys
from pathlib import Path

import jax
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import load_image, official_model  # noqa: E402
from test_parity import NETS, OPTIONS, SIZES, VERSIONS, largest_error, official_distance, pair_images, random_trunk_pair  # noqa: E402

import lpips_jax  # noqa: E402
from lpips_jax.convert.convert import to_lpips_state_dict  # noqa: E402


def main():
  rows = []
  for net in NETS:
    errors = []
    for option in OPTIONS:
      worst = 0.0
      for version in VERSIONS:
        model, params = random_trunk_pair(official_model, net, version, option != "baseline")
        for size in SIZES:
          a, b = pair_images((2, *size), seed=sum(size))
          if option == "normalize":
            a, b = (a + 1) / 2, (b + 1) / 2
          kw = dict(spatial=option == "spatial", per_layer=option == "per_layer", normalize=option == "normalize")
          ref, ours = official_distance(model, a, b, **kw), lpips_jax.distance(params, a, b, **kw)
          pairs = list(zip([ours[0], *ours[1]], [ref[0], *ref[1]])) if kw["per_layer"] else [(ours, ref)]
          worst = max(worst, *(largest_error(o, r) for o, r in pairs))
      errors.append(worst)
    params = lpips_jax.load(net)
    model = official_model(net)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in to_lpips_state_dict(params).items()})
    ref = np.concatenate([load_image("ex_ref")] * 2)
    other = np.concatenate([load_image("ex_p0"), load_image("ex_p1")])
    ours = np.asarray(lpips_jax.distance(params, ref, other))
    official = official_distance(model, ref, other, spatial=False, per_layer=False, normalize=False)
    rows.append((net, errors, largest_error(ours, official), ours))
  print("| net | " + " | ".join(OPTIONS) + " | pretrained, example images | d(ref, p0), d(ref, p1) |")
  print("|---" * (len(OPTIONS) + 3) + "|")
  for net, errors, pretrained, ours in rows:
    print(f"| {net} | " + " | ".join(f"{e:.1e}" for e in errors) + f" | {pretrained:.1e} | "
          f"{ours[0]:.6f}, {ours[1]:.6f} |")
  print(f"\njax {jax.__version__}, torch {torch.__version__}, CPU float32")


if __name__ == "__main__":
  main()
