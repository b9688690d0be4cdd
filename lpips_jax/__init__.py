"""lpips-jax: the LPIPS perceptual distance (Zhang et al., CVPR 2018) in JAX, exact to the official `lpips` 0.1.4.

The public names are imported on first use (PEP 562), so `import lpips_jax` does not import JAX yet: the
`lpips-jax` command can answer Ctrl-C during JAX's start-up with its one line.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

# Installed, convert/ and train/ are the subpackages lpips_jax.convert and lpips_jax.train (pyproject.toml). In the
# repository they sit beside this folder, and Python imports this folder when run from the repository root
# (`python -m lpips_jax train`): look for the subpackages there too.
_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "train" / "main.py").is_file():
  __path__.append(str(_ROOT))

# Each public name and the module that defines it.
_EXPORTS = {"LPIPS": "lpips_jax.modules", "NNXLPIPS": "lpips_jax.modules", "distance": "lpips_jax.lpips",
            "distance_from_features": "lpips_jax.lpips", "diversity": "lpips_jax.all_pairs",
            "features": "lpips_jax.lpips", "load": "lpips_jax.weights", "metrics": None,
            "pairwise": "lpips_jax.all_pairs", "score_pairs": "lpips_jax.scoring", "stats": None}  # None: a module

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
  from lpips_jax import metrics, stats
  from lpips_jax.all_pairs import diversity, pairwise
  from lpips_jax.lpips import distance, distance_from_features, features
  from lpips_jax.modules import LPIPS, NNXLPIPS
  from lpips_jax.scoring import score_pairs
  from lpips_jax.weights import load


def __getattr__(name: str):
  module = _EXPORTS.get(name)
  if module is None:  # a submodule (`lpips_jax.weights`, ...), as if the package had imported it
    if name.startswith("_") or importlib.util.find_spec(f"lpips_jax.{name}") is None:
      raise AttributeError(f"module 'lpips_jax' has no attribute {name!r}")
    value = importlib.import_module(f"lpips_jax.{name}")
  else:
    value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))

