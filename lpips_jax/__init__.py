"""lpips-jax: the LPIPS perceptual distance (Zhang et al., CVPR 2018) in JAX, exact to the official `lpips` 0.1.4.

The public names are imported on first use (PEP 562), so `import lpips_jax` does not import JAX yet: the
`lpips-jax` command can answer Ctrl-C during JAX's start-up with its one line.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

# Each public name and the module that defines it.
_EXPORTS = {"LPIPS": "lpips_jax.modules", "NNXLPIPS": "lpips_jax.modules", "distance": "lpips_jax.lpips",
            "distance_from_features": "lpips_jax.lpips", "diversity": "lpips_jax.pairwise",
            "features": "lpips_jax.lpips", "load": "lpips_jax.weights", "metrics": None,
            "pairwise": "lpips_jax.pairwise", "score_pairs": "lpips_jax.scoring", "stats": None}  # None: a module

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
  from lpips_jax import metrics, stats
  from lpips_jax.lpips import distance, distance_from_features, features
  from lpips_jax.modules import LPIPS, NNXLPIPS
  from lpips_jax.pairwise import diversity, pairwise
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


class _Package(types.ModuleType):
  """The package's type: when a submodule is first imported, the import system binds it as an attribute of the
  package, which for `pairwise` (the function, exported from the submodule of the same name) must not happen."""

  def __setattr__(self, name: str, value) -> None:
    if _EXPORTS.get(name) is not None and isinstance(value, types.ModuleType):
      return
    super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
