"""A small dataset in the BAPPS layout from real photographs, judged by a noisy teacher (needs scikit-image).

BAPPS cannot always be downloaded (CI, offline machines); this builds a stand-in that exercises the same code:
patches of scikit-image's bundled photographs, two traditional distortions of each (noise, blur, JPEG, contrast,
colour shift, pixelation), stored as PNG at twice the load size so the loader's downsampling runs, and judgments
from "people" who follow a teacher metric (the released LPIPS by default) with logistic noise:
P(prefer p1) = sigmoid((d0 - d1) / temperature) per judge. The teacher's own 2AFC score on the result is the
best a learned metric can expect.

  lpips-jax synthetic DIR     # DIR/2afc/{train,val}/synthetic, DIR/jnd/val/synthetic
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from lpips_jax import runner

PROG = "lpips-jax synthetic"

# Photographs at least 320 pixels high, so both bands of `build` hold a whole STORED-pixel crop.
PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
STORED = 128  # patch size on disk; the loader's Resize(64) halves it


def photographs() -> list[np.ndarray]:
  """scikit-image's bundled RGB photographs (no download), uint8 [H, W, 3]."""
  import skimage.data

  return [np.asarray(getattr(skimage.data, name)())[..., :3] for name in PHOTOS]


# The traditional distortions, each with the range its strength is drawn from (uniformly; integers for JPEG quality
# and the pixelated size).
STRENGTHS = {"noise": (3, 40), "blur": (0.5, 4), "jpeg": (3, 50), "contrast": (0.3, 1.7), "colour": (-50, 50),
             "pixelate": (8, 48)}


def distort(patch: np.ndarray, kind: str, rng: np.random.Generator, strengths: dict = STRENGTHS) -> np.ndarray:
  """The distortion `kind` (a key of `strengths`) of a uint8 patch [S, S, 3], its strength drawn from `rng`."""
  low, high = strengths[kind]
  image = Image.fromarray(patch)
  if kind == "noise":
    return np.clip(patch + rng.normal(0, rng.uniform(low, high), patch.shape), 0, 255).astype(np.uint8)
  if kind == "blur":
    return np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(low, high))))
  if kind == "jpeg":
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(low, high)))
    return np.asarray(Image.open(buffer).convert("RGB"))
  if kind == "contrast":
    return np.clip((patch - 128.0) * rng.uniform(low, high) + 128, 0, 255).astype(np.uint8)
  if kind == "colour":
    return np.clip(patch + rng.uniform(low, high, 3), 0, 255).astype(np.uint8)
  small = image.resize((int(rng.integers(low, high)),) * 2, Image.BILINEAR)
  return np.asarray(small.resize(image.size, Image.NEAREST))


def random_distortion(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One of the distortions, chosen by `rng`, of random strength."""
  return distort(patch, list(STRENGTHS)[int(rng.integers(len(STRENGTHS)))], rng)


def crops(n: int, rng: np.random.Generator, rows: tuple[float, float]) -> list[np.ndarray]:
  """n random STORED x STORED crops, cycling through the photographs, lying in the band `rows` (fractions of the
  height), so crops from disjoint bands never share a pixel."""
  photos, out = photographs(), []
  for i in range(n):
    photo = photos[i % len(photos)]
    top, bottom = int(rows[0] * photo.shape[0]), int(rows[1] * photo.shape[0]) - STORED
    y, x = rng.integers(top, bottom + 1), rng.integers(0, photo.shape[1] - STORED + 1)
    out.append(np.ascontiguousarray(photo[y:y + STORED, x:x + STORED]))
  return out


def _write(root: Path, folder: str, index: int, value) -> str:
  (root / folder).mkdir(parents=True, exist_ok=True)
  if folder in ("judge", "same"):
    path = root / folder / f"{index:06d}.npy"
    np.save(path, np.array([value], np.float64))
  else:
    path = root / folder / f"{index:06d}.png"
    Image.fromarray(value).save(path, compress_level=1)  # lossless either way; fast
  return str(path)


def _teacher_distances(teacher, a: list[str], b: list[str]) -> np.ndarray:
  import lpips_jax
  from lpips_jax.train.data import load_image

  x, y = (np.stack([load_image(p) for p in paths]) for paths in (a, b))
  return lpips_jax.score_pairs(teacher, x, y, batch_size=50)


def write_2afc(root: Path, n: int, *, judges: int, rows: tuple[float, float], teacher, temperature: float,
               seed: int) -> dict[str, np.ndarray]:
  """n triplets in `root/{ref,p0,p1,judge}`; returns the teacher's distances `d0`, `d1` and the `judge` values."""
  rng = np.random.default_rng(seed)
  paths = {"ref": [], "p0": [], "p1": []}
  for i, patch in enumerate(crops(n, rng, rows)):
    for name, image in (("ref", patch), ("p0", random_distortion(patch, rng)), ("p1", random_distortion(patch, rng))):
      paths[name].append(_write(root, name, i, image))
  d0, d1 = (_teacher_distances(teacher, paths["ref"], paths[p]) for p in ("p0", "p1"))
  prefer1 = 1 / (1 + np.exp(-(d0 - d1) / temperature))
  judge = rng.binomial(judges, prefer1) / judges
  for i, value in enumerate(judge):
    _write(root, "judge", i, value)
  return {"d0": d0, "d1": d1, "judge": judge.astype(np.float32)}


def write_jnd(root: Path, n: int, *, judges: int, rows: tuple[float, float], teacher, scale: float,
              seed: int) -> dict[str, np.ndarray]:
  """n pairs (a patch, a distortion of it) in `root/{p0,p1,same}`; P(same) = exp(-d / scale) per judge."""
  rng = np.random.default_rng(seed)
  paths = {"p0": [], "p1": []}
  for i, patch in enumerate(crops(n, rng, rows)):
    paths["p0"].append(_write(root, "p0", i, patch))
    paths["p1"].append(_write(root, "p1", i, random_distortion(patch, rng)))
  d = _teacher_distances(teacher, paths["p0"], paths["p1"])
  same = rng.binomial(judges, np.exp(-d / scale)) / judges
  for i, value in enumerate(same):
    _write(root, "same", i, value)
  return {"d": d, "same": same.astype(np.float32)}


def build(root: str | Path, *, n_train: int = 600, n_val: int = 300, n_jnd: int = 200, teacher=None,
          temperature: float = 0.03, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """Write `root/2afc/train/synthetic` (2 judges per triplet, as BAPPS train), `root/2afc/val/synthetic`
  (5 judges, as BAPPS val) and `root/jnd/val/synthetic` (3 judges); train and val come from the top 60% and the
  bottom 40% of the photographs. `teacher`: lpips_jax params (default: released Alex v0.1).
  Returns the teacher's distances and the judgments of each set."""
  import lpips_jax

  root = Path(root)
  teacher = teacher if teacher is not None else lpips_jax.load("alex")
  return {
      "train": write_2afc(root / "2afc/train/synthetic", n_train, judges=2, rows=(0, .6), teacher=teacher,
                          temperature=temperature, seed=seed),
      "val": write_2afc(root / "2afc/val/synthetic", n_val, judges=5, rows=(.6, 1), teacher=teacher,
                        temperature=temperature, seed=seed + 1),
      "jnd": write_jnd(root / "jnd/val/synthetic", n_jnd, judges=3, rows=(.6, 1), teacher=teacher, scale=0.05,
                       seed=seed + 2),
  }


def main(argv=None) -> int:
  """`lpips-jax synthetic DIR`: its exit status (`lpips_jax.runner`)."""
  return runner.run(PROG, synthetic_command, argv)


def synthetic_command(argv: list[str]) -> None:
  """Build the set and print the teacher's scores on it."""
  parser = runner.Parser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument("dir", type=Path, help="where the set goes: DIR/2afc/{train,val}/synthetic and "
                      "DIR/jnd/val/synthetic")
  args = parser.parse_args(argv)
  runner.require(PROG, ["skimage"], "jax-lpips[train]")
  from lpips_jax.train.evaluate import score_2afc, score_jnd

  sets = build(args.dir)
  print(f"teacher 2AFC: train {100 * score_2afc(**sets['train']):.2f}, val {100 * score_2afc(**sets['val']):.2f}; "
        f"JND mAP {100 * score_jnd(sets['jnd']['d'], sets['jnd']['same']):.2f}")


if __name__ == "__main__":
  runner.exit(main())
