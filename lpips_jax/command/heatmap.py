"""The command's heat map (`--spatial OUT.png`): the two images and their spatial LPIPS distance, in one figure."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lpips_jax.checks import check_images, check_structure
from lpips_jax.command.pairs import read, size_error
from lpips_jax.errors import InputError
from lpips_jax.files import atomic_write
from lpips_jax.lpips import distance_from_features, features


def heat_map(params, a_path: Path, b_path: Path, out: Path, *, resize: bool, vmax: float | None = None) -> np.ndarray:
  """Draw [a | b | spatial distance with a colour bar] into a PNG; returns the distance map [H, W] it shows."""
  a = read(a_path)
  b = read(b_path, (a.shape[1], a.shape[0]) if resize else None)
  if a.shape != b.shape:
    raise size_error(a_path, a, b_path, b)
  check_images(a[None], b[None], check_structure(params).net)
  f0, f1 = features(params, a[None]), features(params, b[None])  # one trunk pass each, for the map and the total
  d = np.asarray(distance_from_features(params, f0, f1, spatial_size=a.shape[:2]))[0]
  total = float(distance_from_features(params, f0, f1)[0])
  figure = heat_figure(a, b, d, total=total, vmax=vmax, names=tuple(os.fsencode(p.name).decode("utf-8", "replace")
                                                                     for p in (a_path, b_path)))
  atomic_write(out, lambda f: figure.savefig(f, format=out.suffix[1:].lower() or "png", dpi=100))
  return d


def heat_figure(a: np.ndarray, b: np.ndarray, d: np.ndarray, *, total: float, vmax: float | None = None,
                names: tuple[str, str] = ("a", "b")):
  """A matplotlib figure: the two images [H, W, 3] in [-1, 1] and the map `d` [H, W] in a perceptual colour map
  (magma) with a colour bar in distance units, the distance `total` in the title; the scale runs from 0 to `vmax`
  (default: the map's maximum). Small images are enlarged (each panel is 3 inches wide, nearest-neighbour)."""
  try:
    import matplotlib
  except ImportError:
    raise InputError("--spatial draws with matplotlib: pip install matplotlib") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  top = float(d.max()) if vmax is None else vmax
  if not top > 0:
    raise InputError(f"the heat map's scale must end above 0, got {top:g} (--spatial-max)")
  height = 3 * a.shape[0] / a.shape[1]
  figure, axes = plt.subplots(1, 3, figsize=(9.8, height + 0.8), gridspec_kw={"width_ratios": [1, 1, 1.25]})
  for ax, image, name in zip(axes, (a, b), names):
    ax.imshow(np.clip((image + 1) / 2, 0, 1), interpolation="nearest")
    ax.set_title(name, fontsize=9)
  shown = axes[2].imshow(d, cmap="magma", vmin=0, vmax=top, interpolation="nearest")
  axes[2].set_title("spatial distance", fontsize=9)
  figure.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04, label="LPIPS per pixel")
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  figure.suptitle(f"LPIPS distance {total:.4f}" + (f" (scale fixed at {vmax:g})" if vmax is not None else ""))
  figure.tight_layout()
  plt.close(figure)
  return figure
