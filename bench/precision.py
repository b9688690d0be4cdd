"""bfloat16 (and float16) trunks against float32: the README's mixed-precision table.

Largest relative error of the distance on the example images and on 256 triplets (512 pairs) of real photographs
(patches of scikit-image's bundled images with traditional distortions, tests/test_precision.py), and the fraction of
2AFC decisions (which distortion is closer to the reference) that agree with float32.
Run: python bench/precision.py
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import load_image  # noqa: E402
from test_precision import triplets  # noqa: E402

import lpips_jax  # noqa: E402


def main():
  ref, p0, p1 = triplets(256)
  ex_ref = np.concatenate([load_image("ex_ref")] * 2)
  ex = np.concatenate([load_image("ex_p0"), load_image("ex_p1")])
  print("| net | dtype | max rel. error, example images | max error / max(d, 0.05), 512 photo pairs | 2AFC agreement |")
  print("|---|---|---|---|---|")
  for net in ("alex", "vgg", "squeeze"):
    params = lpips_jax.load(net)
    run = lambda a, b, dtype: np.asarray(lpips_jax.distance(params, a, b, dtype=dtype), np.float64)
    base = [run(ref, p, None) for p in (p0, p1)]
    base_ex = run(ex_ref, ex, None)
    for dtype in (jnp.bfloat16, jnp.float16):
      low = [run(ref, p, dtype) for p in (p0, p1)]
      low_ex = run(ex_ref, ex, dtype)
      # Relative error where the distance is at least 0.05; mild distortions give distances near 0 (some leave a
      # patch unchanged), where only the absolute error means something.
      err = np.abs(np.concatenate(low) - np.concatenate(base))
      rel = np.max(err / np.maximum(np.concatenate(base), 0.05))
      agree = np.mean((base[0] < base[1]) == (low[0] < low[1]))
      print(f"| {net} | {jnp.dtype(dtype).name} | {np.max(np.abs(low_ex - base_ex) / base_ex):.1e} | {rel:.1e} | "
            f"{100 * agree:.1f}% |")
  print(f"\njax {jax.__version__}, {jax.devices()[0].device_kind}")


if __name__ == "__main__":
  main()
