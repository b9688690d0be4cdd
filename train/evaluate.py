"""Scoring (docs/official.md §4.1, §4.2): 2AFC agreement and JND mAP as pure numpy functions, and the distances of
a set.

`score_2afc` and `score_jnd` take arrays of distances from any metric. `evaluate_2afc` / `evaluate_jnd` compute
LPIPS distances for a BAPPS set with the library's one engine, `lpips_jax.scoring.run_batches` (batch sharded over
all devices, params replicated; the engine pads the short last batch and drops its padding).
"""
from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from tqdm import tqdm

from lpips_jax import distance
from lpips_jax.errors import InputError
from lpips_jax.scoring import prefetch, run_batches
from lpips_jax.train.data import JND, TwoAFC, batches
from lpips_jax.train.model import distances


def _flat(name: str, x) -> np.ndarray:
  x = np.asarray(x, np.float64).reshape(-1)
  if not np.all(np.isfinite(x)):
    raise InputError(f"{name} holds {np.sum(~np.isfinite(x))} non-finite values; scores need finite numbers")
  return x


def score_2afc(d0, d1, judge) -> float:
  """The 2AFC score in [0, 1]: the mean over triplets of the fraction of people who agree with the metric.

  d0, d1: distances of p0 and p1 to the reference, any shape with N elements; judge: the fraction of people who
  preferred p1, N elements in [0, 1]. A triplet scores `1 - judge` if d0 < d1, `judge` if d1 < d0 and 0.5 for a tie
  (official `score_2afc_dataset`).
  """
  return float(np.mean(agreement_2afc(d0, d1, judge)))


def agreement_2afc(d0, d1, judge) -> np.ndarray:
  """Each triplet's agreement with the people, f64 [N] (its mean is `score_2afc`): what a bootstrap resamples."""
  d0, d1, judge = _flat("d0", d0), _flat("d1", d1), _flat("judge", judge)
  if not d0.size == d1.size == judge.size:
    raise InputError(f"d0, d1 and judge must have as many elements; got {d0.size}, {d1.size}, {judge.size}")
  if d0.size == 0:
    raise InputError("no triplets to score")
  return (d0 < d1) * (1 - judge) + (d1 < d0) * judge + (d0 == d1) * 0.5


def voc_ap(rec: np.ndarray, prec: np.ndarray) -> float:
  """Area under a precision-recall curve, the py-faster-rcnn VOC way (not VOC07's 11 points): recall padded with
  0 and 1, precision with 0 and 0 and replaced by its running maximum from the right, summed where recall steps."""
  mrec = np.concatenate([[0.0], rec, [1.0]])
  mpre = np.concatenate([[0.0], prec, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  steps = np.flatnonzero(mrec[1:] != mrec[:-1])
  return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def score_jnd(ds, sames) -> float:
  """JND mAP in [0, 1]: how well small distances pick out the pairs people saw as the same (the paper's JND score).

  ds: distances of N pairs (any shape; flattened, which the official HEAD forgets); sames: the fraction of people
  who saw no difference, N elements in [0, 1], used as soft labels. Pairs are sorted by distance with a stable
  sort (ties keep their input order). NaN if no one ever answered "same" (recall is undefined).
  """
  ds, sames = _flat("ds", ds), _flat("sames", sames)
  if ds.size != sames.size or ds.size == 0:
    raise InputError(f"ds and sames must have as many elements, at least one; got {ds.size} and {sames.size}")
  positives = np.sum(sames)
  if positives == 0:
    return float("nan")
  same = sames[np.argsort(ds, kind="stable")]
  tp = np.cumsum(same)
  fp = np.cumsum(1 - same)
  return voc_ap(tp / positives, tp / (tp + fp))


def triplet_distances(params, ref, p0, p1, *, dtype=None):
  """d(ref, p0), d(ref, p1) of a batch of 2AFC triplets, the reference's trunk run once (for `run_batches`)."""
  return distances(params, ref, p0, p1, dtype=dtype)


def jnd_distances(params, p0, p1, *, dtype=None):
  """d(p0, p1) of a batch of JND pairs (for `run_batches`)."""
  return distance(params, p0, p1, dtype=dtype)


def set_distances(params, data: TwoAFC | JND, *, batch_size: int = 50, mesh: jax.sharding.Mesh | None = None,
                  dtype=None, workers: int = 4, progress: bool = False, desc: str = "") -> list[np.ndarray]:
  """LPIPS distances of every example of a set, in order: `[d0, d1]` (2AFC) or `[d]` (JND), each f32 [N].

  params: lpips_jax params (e.g. `lpips_jax.load('alex')`). Runs on `lpips_jax.scoring.run_batches` (sharded over
  the mesh's "data" axis; default: all devices), images decoded by `workers` threads ahead of the devices.
  """
  keys = ("ref", "p0", "p1") if isinstance(data, TwoAFC) else ("p0", "p1")
  fn = triplet_distances if isinstance(data, TwoAFC) else jnd_distances
  n = len(data.p0)
  images = lambda batch: tuple(batch[k] for k in keys)
  with ThreadPoolExecutor(workers) as pool:
    # Closed on every exit (Ctrl-C too), so the decoding thread stops before the pool shuts down.
    with contextlib.closing(prefetch(map(images, batches(data, np.arange(n), batch_size, pool=pool)), 2)) as stream:
      outs = list(tqdm(run_batches(fn, params, stream, batch_size=batch_size, mesh=mesh, dtype=dtype),
                       total=math.ceil(n / batch_size), desc=desc, disable=not progress, unit="batch"))
  return [np.concatenate([o[i] for o in outs]) for i in range(len(keys) - 1)]


def evaluate_2afc(params, data: TwoAFC, **options) -> tuple[float, np.ndarray, np.ndarray]:
  """(2AFC score, d0, d1) of LPIPS with `params` on a 2AFC set; options as `set_distances`."""
  d0, d1 = set_distances(params, data, **options)
  return score_2afc(d0, d1, data.judge), d0, d1


def evaluate_jnd(params, data: JND, **options) -> tuple[float, np.ndarray]:
  """(JND mAP, d) of LPIPS with `params` on a JND set; options as `set_distances`."""
  (d,) = set_distances(params, data, **options)
  return score_jnd(d, data.same), d
