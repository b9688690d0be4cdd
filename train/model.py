"""The trainable LPIPS model: initialisation, the ranking head and the 2AFC loss (port of `lpips.Trainer`'s model).

Training params are `{"lpips": params in lpips_jax's layout, "rank": the ranking head}`, so `params["lpips"]` is
usable with `lpips_jax.distance` at any time. The ranking head (`Dist2LogitLayer`) and the binary cross-entropy are
training-only (docs/official.md §3.2); they are discarded when the metric is exported.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lpips_jax.backbones import NETS
from lpips_jax.layout import scaling
from lpips_jax.lpips import distance_from_features, features
from lpips_jax.weights import load

RANK_EPS = 0.1  # Dist2LogitLayer's eps in d0 / (d1 + eps)
RANK_WIDTH = 32  # chn_mid


# Random arrays are drawn flat and reshaped: XLA compiles a multi-dimensional threefry draw several times slower.
def _uniform(rng: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
  return jax.random.uniform(rng, (math.prod(shape),), jnp.float32, -bound, bound).reshape(shape)


@functools.partial(jax.jit, static_argnums=1)  # jitted: one compilation, not one per array shape
def init_heads(rng: jax.Array, net: str) -> dict:
  """Random heads `{"lin{k}": {"kernel": f32[1, 1, C_k, 1]}}`, PyTorch's default for a bias-free 1x1 conv:
  U(-1/sqrt(C_k), 1/sqrt(C_k)) (kaiming_uniform with a = sqrt(5)), as the official trainer's `pretrained=False`."""
  keys = jax.random.split(rng, len(NETS[net].channels))
  return {f"lin{k}": {"kernel": _uniform(key, (1, 1, c, 1), 1 / math.sqrt(c))}
          for k, (key, c) in enumerate(zip(keys, NETS[net].channels))}


@jax.jit
def init_rank(rng: jax.Array) -> dict:
  """The ranking head: three 1x1 convs 5 -> 32 -> 32 -> 1 with biases, as dense layers
  `{"conv{i}": {"kernel": f32[in, out], "bias": f32[out]}}`; PyTorch's default init, U(+-1/sqrt(fan_in)) for both."""
  shapes = ((5, RANK_WIDTH), (RANK_WIDTH, RANK_WIDTH), (RANK_WIDTH, 1))
  keys = jax.random.split(rng, 2 * len(shapes))
  return {f"conv{i}": {"kernel": _uniform(keys[2 * i], (n_in, n_out), 1 / math.sqrt(n_in)),
                       "bias": _uniform(keys[2 * i + 1], (n_out,), 1 / math.sqrt(n_in))}
          for i, (n_in, n_out) in enumerate(shapes)}


def _torchvision_scale(net: str, shape: tuple[int, ...]) -> tuple[float, float]:
  """(kernel scale, bias bound) of torchvision's init of a trunk conv with HWIO kernel `shape` (`pnet_rand=True`,
  docs/official.md §1.3): the std of a normal (vgg) or the bound of a uniform (alex, squeeze) kernel; bias bound 0:
  zeros."""
  k_h, k_w, c_in, c_out = shape
  if net == "vgg":  # kaiming_normal(fan_out, relu), zero bias
    return math.sqrt(2 / (c_out * k_h * k_w)), 0.0
  if net == "squeeze":  # kaiming_uniform (a = 0) on fan_in, zero bias
    return math.sqrt(6 / (c_in * k_h * k_w)), 0.0
  bound = 1 / math.sqrt(c_in * k_h * k_w)  # alex: PyTorch's conv default, kaiming_uniform(a = sqrt 5), U bias
  return bound, bound


@functools.partial(jax.jit, static_argnums=1)
def init_trunk(rng: jax.Array, net: str) -> dict:
  """A randomly initialised trunk in lpips_jax's layout (the `scratch` mode's starting point). The ST-LPIPS trunks
  initialise their convolutions as the torchvision nets they come from (stlpips_pytorch's VGG16 as torchvision's
  VGG16, its AlexNet with PyTorch's defaults)."""
  shapes = jax.eval_shape(NETS[net].trunk().init, rng, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  net = net.removesuffix("_st")
  convs = [(tuple(k.key for k in p[:-1]), s.shape) for p, s in
           jax.tree_util.tree_flatten_with_path(shapes["params"])[0] if p[-1].key == "kernel"]
  # One draw for all kernels and one for all biases, cut into layers (one draw per layer compiles slowly).
  k_kernel, k_bias = jax.random.split(rng)
  sizes = [math.prod(shape) for _, shape in convs]
  if net == "vgg":
    kernels = jax.random.normal(k_kernel, (sum(sizes),), jnp.float32)
  else:
    kernels = jax.random.uniform(k_kernel, (sum(sizes),), jnp.float32, -1, 1)
  biases = jax.random.uniform(k_bias, (sum(shape[3] for _, shape in convs),), jnp.float32, -1, 1)
  out, start, bias_start = {}, 0, 0
  for (path, shape), size in zip(convs, sizes):
    scale, bias_bound = _torchvision_scale(net, shape)
    node = out
    for key in path:
      node = node.setdefault(key, {})
    node["kernel"] = kernels[start:start + size].reshape(shape) * scale
    node["bias"] = (biases[bias_start:bias_start + shape[3]] * bias_bound if bias_bound
                    else jnp.zeros(shape[3], jnp.float32))
    start, bias_start = start + size, bias_start + shape[3]
  return out


def init_params(rng: jax.Array, *, net: str, version: str, mode: str, heads_init: str = "random") -> dict:
  """Training params `{"lpips": ..., "rank": ...}`: the ImageNet trunk (lin, tune) or a random one (scratch),
  the v0.1 scaling constants, random (or the released) heads, and a random ranking head."""
  k_trunk, k_heads, k_rank = jax.random.split(rng, 3)
  if mode == "scratch":
    metric = {**scaling(version), net: init_trunk(k_trunk, net)}
  else:
    metric = load(net, version, lpips=heads_init == "pretrained")
  if heads_init == "random":
    metric.update(init_heads(k_heads, net))
  rank = init_rank(k_rank)
  return jax.tree.map(jnp.asarray, {"lpips": metric, "rank": rank})


def rank_logit(rank: dict, d0: jax.Array, d1: jax.Array) -> jax.Array:
  """The ranking head's logit [N] that p1 is preferred, from the distances d0, d1 [N] (`Dist2LogitLayer`).

  Inputs `[d0, d1, d0 - d1, d0 / (d1 + .1), d1 / (d0 + .1)]`; two LeakyReLU(0.2) layers (the paper says ReLU; the
  code has always used LeakyReLU). The official applies a sigmoid; the loss takes the logit for stability.
  """
  x = jnp.stack([d0, d1, d0 - d1, d0 / (d1 + RANK_EPS), d1 / (d0 + RANK_EPS)], axis=-1)
  hi = jax.lax.Precision.HIGHEST
  for i in range(2):
    x = jax.nn.leaky_relu(jnp.dot(x, rank[f"conv{i}"]["kernel"], precision=hi) + rank[f"conv{i}"]["bias"][None], 0.2)
  return (jnp.dot(x, rank["conv2"]["kernel"], precision=hi) + rank["conv2"]["bias"][None])[:, 0]


def bce(logit: jax.Array, target: jax.Array) -> jax.Array:
  """Per-example binary cross-entropy of sigmoid(logit) against `target` in [0, 1] (torch `BCELoss`, whose log
  terms are clamped at -100)."""
  return -(target * jnp.maximum(jax.nn.log_sigmoid(logit), -100.0)
           + (1 - target) * jnp.maximum(jax.nn.log_sigmoid(-logit), -100.0))


def distances(params: dict, ref, p0, p1, *, dropout_rng: jax.Array | None = None, dtype=None):
  """LPIPS d(ref, p0), d(ref, p1), each [N], from images [N, H, W, 3] in [-1, 1]; the reference's trunk runs once.

  `dropout_rng` draws the training dropout, independently for the two distances (the official calls forward twice).
  """
  f_ref, f0, f1 = (features(params, x, dtype=dtype) for x in (ref, p0, p1))
  keys = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
  return tuple(distance_from_features(params, f_ref, f, dropout_rng=key) for f, key in zip((f0, f1), keys))


def loss_fn(params: dict, batch: dict, *, dropout_rng: jax.Array | None = None, dtype=None):
  """The 2AFC ranking loss, the mean BCE over the real examples of `batch` (what is differentiated), and the sums
  over those examples.

  batch: `ref`, `p0`, `p1` f32 [N, H, W, 3] in [-1, 1]; `judge` f32 [N], the fraction of people who preferred p1;
  `weight` f32 [N], 1 for real examples and 0 for padding.
  Returns `(loss, {"loss_sum", "acc_sum", "count"})`: sums over the real examples and their number, so that steps
  of different sizes add up exactly; `acc` is the official train-time accuracy (d1 < d0 agrees with the judge).
  """
  d0, d1 = distances(params["lpips"], batch["ref"], batch["p0"], batch["p1"], dropout_rng=dropout_rng, dtype=dtype)
  judge, weight = batch["judge"], batch["weight"]
  count = jnp.sum(weight)
  loss_sum = jnp.sum(weight * bce(rank_logit(params["rank"], d0, d1), judge))
  closer1 = (d1 < d0).astype(jnp.float32)
  acc_sum = jnp.sum(weight * (closer1 * judge + (1 - closer1) * (1 - judge)))
  return loss_sum / count, {"loss_sum": loss_sum, "acc_sum": acc_sum, "count": count}
