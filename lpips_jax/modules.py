"""LPIPS as a Flax module, for users who compose it into their own linen or NNX model.

Both hold the pretrained weights as state of the user's model, loaded when the model is initialised, and call
`lpips_jax.distance` on them. By default the weights are *not* trainable parameters: the linen module keeps them in
the "lpips" collection (not "params"), the NNX module in `LPIPSWeights` variables (not `nnx.Param`), so an
optimiser over the model's parameters never sees or decays them. `trainable=True` makes them parameters.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from lpips_jax.backbones import NETS, net_name
from lpips_jax.checks import check_params
from lpips_jax.errors import InputError
from lpips_jax.lpips import distance
from lpips_jax.weights import load


def _pretrained(net: str, version: str, lpips: bool) -> dict:
  return load(net, version, lpips=lpips)


class LPIPS(nn.Module):
  """LPIPS inside a linen model: `LPIPS(net)(a, b)` is `lpips_jax.distance(load(net, version), a, b)`.

  Attributes:
    net, version, lpips: as in `lpips_jax.load`.
    trainable: put the weights in the "params" collection instead of "lpips".
    dtype, precision, remat: as in `lpips_jax.distance` (e.g. `dtype=jnp.bfloat16` in a bfloat16 model).

  Example:
    >>> class Loss(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, target):
    ...     return LPIPS("alex")(nn.Dense(3)(x), target).mean()
    >>> variables = Loss().init(rng, x, target)   # {"params": ..., "lpips": ...}
    >>> loss = Loss().apply(variables, x, target)   # grads w.r.t. variables["params"] leave LPIPS alone
  """

  net: str = "alex"
  version: str = "0.1"
  lpips: bool = True
  trainable: bool = False
  dtype: Any = None
  precision: Any = None
  remat: bool = False

  @nn.compact
  def __call__(self, a, b, *, key=None, samples: int = 1, spatial: bool = False, per_layer: bool = False,
               normalize: bool = False):
    """Same arguments and result as `lpips_jax.distance`. E-LPIPS's key, unless given, is drawn from the "elpips"
    rng stream: `model.apply(variables, ..., rngs={"elpips": key})`."""
    weights = self.variable("params" if self.trainable else "lpips", "weights", _pretrained, self.net, self.version,
                            self.lpips)
    if key is None and NETS[net_name(self.net)].ensemble:
      if not self.has_rng("elpips"):
        raise InputError("E-LPIPS draws random transformations: apply the model with rngs={'elpips': key} (a new "
                         "key per step), or pass key= to this module")
      key = self.make_rng("elpips")
    return distance(weights.value, a, b, key=key, samples=samples, spatial=spatial, per_layer=per_layer,
                    normalize=normalize, dtype=self.dtype, precision=self.precision, remat=self.remat)


class LPIPSWeights(nnx.Variable):
  """The pretrained LPIPS weights in an NNX model: a variable type of its own, so `nnx.Param` filters skip it."""


class NNXLPIPS(nnx.Module):
  """LPIPS inside an NNX model: `NNXLPIPS(net)(a, b)` is `lpips_jax.distance(load(net, version), a, b)`.

  `trainable=True` stores the weights as `nnx.Param` (e.g. to fine-tune the heads inside a larger model);
  `dtype`, `precision` and `remat` are passed to `lpips_jax.distance`.

  Example:
    >>> metric = NNXLPIPS("alex")
    >>> metric(a, b).shape
    (N,)
  """

  def __init__(self, net: str = "alex", version: str = "0.1", *, lpips: bool = True, trainable: bool = False,
               dtype=None, precision=None, remat: bool = False, rngs: nnx.Rngs | None = None):
    self.dtype, self.precision, self.remat = dtype, precision, remat
    kind = nnx.Param if trainable else LPIPSWeights
    self.weights = nnx.data(jax.tree.map(kind, _pretrained(net, version, lpips)))
    self.rngs = rngs  # E-LPIPS: each call without a key draws one from rngs.elpips()

  def __call__(self, a, b, *, key=None, samples: int = 1, spatial: bool = False, per_layer: bool = False,
               normalize: bool = False):
    """Same arguments and result as `lpips_jax.distance`. E-LPIPS's key, unless given, is the module's next
    `rngs.elpips()` key: `NNXLPIPS("vgg_ensemble", rngs=nnx.Rngs(elpips=0))`."""
    params = jax.tree.map(lambda v: v.get_value(), self.weights, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if key is None and NETS[check_params(params).net].ensemble:
      if self.rngs is None or not hasattr(self.rngs, "elpips"):
        raise InputError("E-LPIPS draws random transformations: build the module with rngs=nnx.Rngs(elpips=seed), "
                         "or pass key= to each call")
      key = self.rngs.elpips()
    return distance(params, a, b, key=key, samples=samples, spatial=spatial, per_layer=per_layer,
                    normalize=normalize, dtype=self.dtype, precision=self.precision, remat=self.remat)
