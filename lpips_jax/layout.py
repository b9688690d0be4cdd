"""The params layout: what a params pytree holds for each net, weight version and mode (docs/official.md §1).

A params pytree is a dict with
  - the trunk, under its net name: `"alex"`, `"vgg"`, `"squeeze"`, or the ST-LPIPS `"alex_st"`, `"vgg_st"` (linen
    params of `backbones.NETS[net].trunk`);
  - `"scaling": {"shift": f32[3], "scale": f32[3]}` for version 0.1 only (the official `ScalingLayer` buffers);
  - `"lin0"` ... `"lin{L-1}": {"kernel": f32[1, 1, C_l, 1]}`, the linear heads, absent for the uncalibrated
    baseline (the official `lpips=False`).
Which of these a params pytree is, its `Variant`, is read off its keys (`lpips_jax.checks.params_variant`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lpips_jax.backbones import NETS
from lpips_jax.errors import InputError

# Official ScalingLayer: ImageNet mean/std re-expressed for inputs in [-1, 1] (shift = 2 mean - 1, scale = 2 std).
SHIFT = np.array([-.030, -.088, -.188], np.float32)
SCALE = np.array([.458, .448, .450], np.float32)
# The official weight versions and whether each scales the input: 0.1 does; 0.0, the original release, does not.
VERSIONS = {"0.0": False, "0.1": True}


class Variant(NamedTuple):
  """What a params pytree computes: the net, whether it scales its input (version 0.1) and whether it has heads."""

  net: str
  scaled: bool  # version 0.1
  lpips: bool  # linear heads (False: the uncalibrated baseline, an unweighted channel sum)

  @property
  def version(self) -> str:
    return next(name for name, scaled in VERSIONS.items() if scaled == self.scaled)

  def __str__(self) -> str:
    """How the command names it: 'alex v0.1', 'vgg_st v0.1', 'squeeze v0.0 baseline'."""
    return f"{self.net} v{self.version}{'' if self.lpips else ' baseline'}"


@functools.cache
def param_shapes(net: str, version: str = "0.1", lpips: bool = True) -> dict:
  """The pytree of parameter shapes for a variant: the reference every weight file and params is checked against."""
  spec = NETS[net]
  trunk = jax.eval_shape(spec.trunk().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  shapes = {net: jax.tree.map(lambda s: s.shape, trunk["params"])}
  if VERSIONS[version]:
    shapes["scaling"] = {"shift": (3,), "scale": (3,)}
  if lpips:
    shapes.update({f"lin{k}": {"kernel": (1, 1, c, 1)} for k, c in enumerate(spec.channels)})
  return shapes


def scaling(version: str) -> dict:
  """The params entries of the input scaling: `{"scaling": {"shift", "scale"}}` for version 0.1, `{}` for 0.0."""
  if not isinstance(version, str) or version not in VERSIONS:
    raise InputError(f"unknown version {version!r}; choose the string '0.1' (default) or '0.0'")
  return {"scaling": {"shift": SHIFT.copy(), "scale": SCALE.copy()}} if VERSIONS[version] else {}
