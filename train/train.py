"""Training LPIPS on 2AFC judgments (docs/official.md §3): the optimiser, a sharded train step, and the training loop.

The policy is optax's: Adam(1e-4, b1 0.5, b2 0.999) on the trainable leaves, zero updates on the frozen ones, and
the projection of the heads (and by default SqueezeNet's 1x1 trunk kernels, as the official `clamp_weights`) onto
non-negative weights, last in the chain. The state is a `TrainState` value; `train_step` maps (state, batch, rng) to
(state, metrics) and is jitted over a 1-D "data" mesh of all local devices (`local_mesh`; batch sharded, state
replicated). `train_and_evaluate`, last, runs a whole training from the pieces before it, as flax's
examples/imagenet does: create the state, restore or start, step, evaluate, log, checkpoint, plot, export (the run's
directory, its checkpoints and resuming: `train.checkpoints`).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax.training.dynamic_scale import DynamicScale
from jax.sharding import NamedSharding, PartitionSpec

from lpips_jax.errors import InputError
from lpips_jax.files import atomic_write
from lpips_jax.scoring import local_mesh, padded_batch_size, prefetch
from lpips_jax.train.checkpoints import checkpoint_manager, hold, restore_or_start, run_position, save_checkpoint
from lpips_jax.train.config import DTYPES, Config
from lpips_jax.train.data import TwoAFC, batches, epoch_order, read_2afc
from lpips_jax.train.evaluate import evaluate_2afc
from lpips_jax.train.model import init_params, loss_fn
from lpips_jax.weights import save

# Dynamic loss scaling for float16: start high, halve on overflow (and skip that step), double on the
# LOSS_SCALE_PERIOD-th finite step in a row (the usual scheme of NVIDIA apex / torch.amp.GradScaler).
LOSS_SCALE_INIT = 2.0 ** 15
LOSS_SCALE_PERIOD = 2000


class TrainState(NamedTuple):
  params: Any  # {"lpips": lpips_jax params, "rank": ranking head}, float32
  opt_state: optax.OptState
  step: jax.Array  # int32 []: steps taken, the run's one step counter; the data position is divmod(step, per epoch)
  rng: jax.Array  # uint32 [2]: the run's dropout key; step s uses fold_in(rng, s)
  dynamic_scale: DynamicScale  # float16's loss scale and its finite-step count (scale 1 and unused otherwise)


def lr_schedule(lr: float, steps_per_epoch: int, epochs: int, epochs_decay: int) -> optax.Schedule:
  """The official schedule over steps: `lr` for epochs 1..epochs+1, then `lr / epochs_decay` less after each
  later epoch (defaults: 1e-4 for epochs 1-6, then 8e-5, 6e-5, 4e-5, 2e-5; docs/official.md §3.3)."""
  def schedule(step):
    epoch = step // steps_per_epoch  # 0-based
    if not epochs_decay:
      return jnp.full((), lr, jnp.float32)
    decayed = jnp.clip(epoch - epochs, 0, epochs_decay).astype(jnp.float32)
    return lr * (1 - decayed / epochs_decay)
  return schedule


def _top(path) -> tuple[str, str | None]:
  return path[0].key, (path[1].key if len(path) > 1 else None)


def trainable_labels(params, mode: str):
  """'train' or 'frozen' for each leaf: heads and ranking head always train, the trunk in 'tune' and 'scratch',
  the input scaling never."""
  def label(path, _):
    group, key = _top(path)
    if group == "rank" or key.startswith("lin"):
      return "train"
    if key == "scaling":
      return "frozen"
    return "frozen" if mode == "lin" else "train"
  return jax.tree_util.tree_map_with_path(label, params)


def nonneg_mask(params, nonneg: str = "official"):
  """True for each leaf projected onto >= 0 after every step: the heads' kernels, and with 'official' every
  1x1 trunk kernel (SqueezeNet's Fire squeeze/expand1x1; AlexNet and VGG have none), trained or not."""
  def mask(path, leaf):
    group, key = _top(path)
    if group != "lpips" or key == "scaling" or path[-1].key != "kernel":
      return False
    if key.startswith("lin"):
      return True
    return nonneg == "official" and tuple(jnp.shape(leaf)[:2]) == (1, 1)
  return jax.tree_util.tree_map_with_path(mask, params)


def make_optimizer(params, *, mode: str, schedule: optax.Schedule, b1: float = 0.5, b2: float = 0.999,
                   eps: float = 1e-8, nonneg: str = "official") -> optax.GradientTransformation:
  """Adam on the trainable leaves, nothing on the frozen ones, then the non-negative projection."""
  return optax.chain(
      optax.multi_transform({"train": optax.adam(schedule, b1=b1, b2=b2, eps=eps), "frozen": optax.set_to_zero()},
                            trainable_labels(params, mode)),
      optax.masked(optax.keep_params_nonnegative(), nonneg_mask(params, nonneg)),
  )


def init_state(params, tx: optax.GradientTransformation, rng: jax.Array, *, dtype=None) -> TrainState:
  """The state before the first step; `dtype` float16 starts the loss scale at LOSS_SCALE_INIT."""
  scale = LOSS_SCALE_INIT if dtype == jnp.float16 else 1.0
  # DynamicScale doubles the scale on the finite step after `growth_interval` finite ones: the PERIOD-th in a row.
  dynamic_scale = DynamicScale(growth_interval=LOSS_SCALE_PERIOD - 1, minimum_scale=1.0,
                               fin_steps=jnp.zeros((), jnp.int32), scale=jnp.full((), scale, jnp.float32))
  return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jnp.asarray(rng, jnp.uint32), dynamic_scale)


def freeze(params, mode: str):
  """`params` with gradients stopped at the frozen leaves, so only the trainable subtree is differentiated."""
  labels = trainable_labels(params, mode)
  return jax.tree.map(lambda p, label: p if label == "train" else jax.lax.stop_gradient(p), params, labels)


def train_step(state: TrainState, batch: dict, rng: jax.Array | None, *, tx: optax.GradientTransformation,
               mode: str = "lin", dtype=None) -> tuple[TrainState, dict]:
  """One optimiser step on a batch (see `train.model.loss_fn` for its layout).

  rng: this step's dropout key (`fold_in(state.rng, state.step)` in training), or None for no dropout.
  dtype: the trunk's compute dtype (None: float32); float16 scales the loss dynamically (`state.dynamic_scale`) and
  skips steps whose gradients overflow: only the step count and the loss scale change.
  Returns the new state and metrics {"loss_sum", "acc_sum", "count", "grad_norm", "loss_scale", "finite"}: loss and
  accuracy are summed over the batch's real examples (`count`, the sum of `batch["weight"]`), so that averages over
  several steps weigh examples, not steps (a short last batch counts for what it holds).
  """
  f16 = dtype == jnp.float16
  objective = lambda params: loss_fn(freeze(params, mode), batch, dropout_rng=rng, dtype=dtype)
  dynamic_scale, finite = state.dynamic_scale, jnp.ones((), bool)
  if f16:
    dynamic_scale, finite, (_, metrics), grads = dynamic_scale.value_and_grad(objective, has_aux=True)(state.params)
  else:
    grads, metrics = jax.grad(objective, has_aux=True)(state.params)
  with jax.numpy_dtype_promotion("standard"):  # optax's bias correction raises a float to an int32 power
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if f16:
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                     (state.params, state.opt_state))
  new = state._replace(params=params, opt_state=opt_state, step=state.step + 1, dynamic_scale=dynamic_scale)
  return new, {"loss_sum": metrics["loss_sum"], "acc_sum": metrics["acc_sum"], "count": metrics["count"],
               "grad_norm": optax.tree.norm(grads), "loss_scale": state.dynamic_scale.scale, "finite": finite}


def make_train_step(tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, *, mode: str, dtype=None):
  """`train_step` jitted data-parallel over `mesh`'s "data" axis (`local_mesh()`): batch sharded, state replicated
  and donated. On a mesh with Explicit axes, place the state first:
  `jax.device_put(state, NamedSharding(mesh, P()))`."""
  replicated, data = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
  return jax.jit(functools.partial(train_step, tx=tx, mode=mode, dtype=dtype),
                 in_shardings=(replicated, data, replicated), out_shardings=(replicated, replicated),
                 donate_argnums=0)


# -- the training run ----------------------------------------------------------------------------------------------

def create_train_state(config: Config, schedule: optax.Schedule,
                       mesh: jax.sharding.Mesh) -> tuple[TrainState, optax.GradientTransformation]:
  """A run's first state, replicated over `mesh`, and its optimiser: params drawn from `fold_in(PRNGKey(seed), 0)`,
  the dropout key `fold_in(PRNGKey(seed), 1)`."""
  key = jax.random.PRNGKey(config.seed)
  params = init_params(jax.random.fold_in(key, 0), net=config.net, version=config.version, mode=config.mode,
                       heads_init=config.heads_init)
  tx = make_optimizer(params, mode=config.mode, schedule=schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                      nonneg=config.nonneg)
  state = init_state(params, tx, jax.random.fold_in(key, 1), dtype=DTYPES[config.dtype])
  return jax.device_put(state, NamedSharding(mesh, PartitionSpec())), tx


def train_batches(data: TwoAFC, config: Config, start: int, *, pad_to: int,
                  pool: ThreadPoolExecutor) -> Iterator[dict]:
  """The batches of steps `start`, `start + 1`, ... to the run's end: each epoch in its `epoch_order`, so a resumed
  run sees the batches an uninterrupted one would; padded to `pad_to` examples and decoded ahead on `pool`."""
  n, size = len(data.judge), config.batch_size
  steps_per_epoch = math.ceil(n / size)

  def epochs():
    for epoch in range(start // steps_per_epoch, config.epochs + config.epochs_decay):
      skip = max(start - epoch * steps_per_epoch, 0) * size  # the batches a resumed epoch has already trained on
      yield from batches(data, epoch_order(n, config.seed, epoch)[skip:], size, pad_to=pad_to, pool=pool)
  return prefetch(epochs(), config.prefetch)


def evaluate(params, val: dict[str, TwoAFC], config: Config, mesh: jax.sharding.Mesh, step: int, epoch: int) -> dict:
  """The eval record: the 2AFC score of the metric `params["lpips"]` on each validation set, and their mean."""
  scores = {name: evaluate_2afc(params["lpips"], data, batch_size=config.eval_batch_size, mesh=mesh,
                                dtype=DTYPES[config.dtype], workers=config.workers)[0] for name, data in val.items()}
  mean = sum(scores.values()) / len(scores) if scores else None
  return {"kind": "eval", "step": step, "epoch": epoch, "val": scores, "val_mean": mean}


class Diverged(InputError, FloatingPointError):
  """The training loss is not finite: a setting to change (a lower --lr, another --dtype), not a bug."""


def check_finite(metrics: list[dict], step: int, dtype: str) -> None:
  """Raise `Diverged` (a FloatingPointError) naming the first step whose loss is not finite; `metrics` end with
  step `step`'s."""
  for i, m in enumerate(metrics):
    loss = float(m["loss_sum"]) / float(m["count"])
    if not math.isfinite(loss):
      hint = "; or --dtype bfloat16, which has float32's range" if dtype == "float16" else ""
      raise Diverged(f"the training loss is {loss} at step {step - len(metrics) + i + 1}: the weights "
                               f"diverged or the forward pass overflowed; lower --lr{hint}")


def train_record(metrics: list[dict], step: int, steps_per_epoch: int, lr: float, elapsed: float) -> dict:
  """The train record of the steps up to `step` whose `metrics` (host values) are given: loss and accuracy per
  example (sums over counts), the mean gradient norm, the last loss scale and the number of skipped steps."""
  count = sum(float(m["count"]) for m in metrics)
  return {"kind": "train", "step": step, "epoch": step / steps_per_epoch,
          "loss": sum(float(m["loss_sum"]) for m in metrics) / count,
          "acc": sum(float(m["acc_sum"]) for m in metrics) / count, "lr": lr,
          "grad_norm": sum(float(m["grad_norm"]) for m in metrics) / len(metrics),
          "loss_scale": float(metrics[-1]["loss_scale"]), "skipped": sum(not m["finite"] for m in metrics),
          "steps_per_s": len(metrics) / elapsed}


def write_record(log, record: dict, *, progress: bool = False, total_steps: int = 0) -> None:
  """Append `record` to the JSON-lines `log`, flushed (a killed run keeps every line), and with `progress` print it."""
  log.write(json.dumps(record) + "\n")
  log.flush()
  if progress and record["kind"] == "train":
    print(f"step {record['step']}/{total_steps}  loss {record['loss']:.4f}", flush=True)
  elif progress and record["kind"] == "eval" and record["step"] and record["val_mean"] is not None:
    print(f"epoch {record['epoch']}: 2AFC " + ", ".join(f"{k} {100 * v:.2f}" for k, v in record["val"].items()),
          flush=True)


def export(workdir: Path, params, config: Config, steps: int) -> None:
  """Write the trained metric `lpips.safetensors` (for `lpips_jax.load(path)`) and the ranking head
  `rank.safetensors`, each with the run's settings as metadata."""
  # One metadata entry: safetensors writes several in a random order, and the file should depend on its content only.
  meta = {"training": json.dumps({"net": config.net, "version": config.version, "mode": config.mode, "steps": steps,
                                  "dtype": config.dtype, "seed": config.seed}, sort_keys=True)}
  save(workdir / "lpips.safetensors", params["lpips"], metadata=meta)
  save(workdir / "rank.safetensors", params["rank"], metadata=meta)


def plot(log_path: Path, out: Path) -> None:
  """A PNG of the training loss and the validation 2AFC scores over steps, from the JSON-lines log."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
  train = [r for r in records if r.get("kind") == "train"]
  evals = [r for r in records if r.get("kind") == "eval" and r.get("val")]
  fig, (ax_loss, ax_2afc) = plt.subplots(1, 2, figsize=(11, 4))
  ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="loss")
  ax_loss.set(xlabel="step", ylabel="BCE ranking loss", title="training loss")
  for name in dict.fromkeys(name for r in evals for name in r["val"]):  # a resumed run may score other sets
    scored = [r for r in evals if name in r["val"]]
    ax_2afc.plot([r["step"] for r in scored], [100 * r["val"][name] for r in scored], marker=".", label=name)
  if evals:
    ax_2afc.plot([r["step"] for r in evals], [100 * r["val_mean"] for r in evals], "k-", lw=2, label="mean")
    ax_2afc.legend(fontsize="small")
  ax_2afc.set(xlabel="step", ylabel="2AFC score (%)", title="validation 2AFC")
  fig.tight_layout()
  atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
  plt.close(fig)


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during `train_and_evaluate`, raised once the checkpoint being written is complete; the message says
  which checkpoint the run can resume from."""


def _stderr(line: str) -> None:
  print(f"note: {line}", file=sys.stderr, flush=True)


def train_and_evaluate(config: Config, workdir: str | Path, *, resume: bool = False, progress: bool = False,
                       note: Callable[[str], None] = _stderr) -> dict | None:
  """Train LPIPS as `config` says, writing to `workdir`, which it holds alone (`hold`):
  `log.jsonl` (config, train lines every `log_every` steps, eval lines before training and after each epoch, a
  resume line at each resume), `training.png`, `checkpoints/` (Orbax; every `checkpoint_every` steps and at the end),
  and at the end `lpips.safetensors` (the metric, for `lpips_jax.load(path)`) and `rank.safetensors` (the ranking
  head). Files are replaced atomically; the log is appended a whole line at a time.

  `resume` continues from the latest good checkpoint exactly (same parameters as an uninterrupted run; see
  `restore_or_start`). `note` gets one-line notes (a damaged checkpoint passed over, changed settings).
  Returns the last eval record (None if a resumed run had no epoch left to evaluate). Ctrl-C raises `Interrupted`
  once the checkpoint being written is complete.
  """
  workdir, root = Path(workdir), Path(config.dataroot)
  log_path = workdir / "log.jsonl"
  with hold(workdir):
    data = read_2afc([root / name for name in config.datasets])
    val = {name: read_2afc([root / name]) for name in config.val_datasets}
    position = run_position(config, len(data.judge))
    steps_per_epoch = position["steps_per_epoch"]
    total_steps = steps_per_epoch * (config.epochs + config.epochs_decay)
    mesh = local_mesh()
    schedule = lr_schedule(config.lr, steps_per_epoch, config.epochs, config.epochs_decay)
    state, tx = create_train_state(config, schedule, mesh)
    manager = checkpoint_manager(workdir, config.keep_checkpoints)
    try:
      state, resumed = restore_or_start(manager, state, position, workdir, resume=resume, note=note)
      step_fn = make_train_step(tx, mesh, mode=config.mode, dtype=DTYPES[config.dtype])
      start, record = int(state.step), None
      pool = ThreadPoolExecutor(config.workers)
      stream = train_batches(data, config, start, pad_to=padded_batch_size(config.batch_size, mesh),
                             pool=pool)  # padded so that every device gets an equal share
      with open(log_path, "a") as log, pool, contextlib.closing(stream):
        emit = functools.partial(write_record, log, progress=progress, total_steps=total_steps)
        if resumed:
          emit(resumed)
        else:
          emit({"kind": "config", "step": 0, **position["settings"], "devices": mesh.size})
          record = evaluate(state.params, val, config, mesh, 0, 0)
          emit(record)
        pending, started = [], time.perf_counter()
        # `step` counts the steps taken once this one is: it follows state.step without reading it from the device.
        for step, batch in zip(range(start + 1, total_steps + 1), stream):
          rng = jax.random.fold_in(state.rng, state.step) if config.dropout else None
          state, metrics = step_fn(state, jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data"))), rng)
          pending.append(metrics)
          if step % config.log_every == 0 or step % steps_per_epoch == 0:
            values = jax.device_get(pending)
            check_finite(values, step, config.dtype)
            elapsed, started = time.perf_counter() - started, time.perf_counter()
            emit(train_record(values, step, steps_per_epoch, float(schedule(step - 1)), elapsed))
            pending = []
          if step % steps_per_epoch == 0:
            record = evaluate(state.params, val, config, mesh, step, step // steps_per_epoch)
            emit(record)
            plot(log_path, workdir / "training.png")
          if step % config.checkpoint_every == 0 or step == total_steps:
            save_checkpoint(manager, state, position)
    except KeyboardInterrupt:
      manager.wait_until_finished()  # the checkpoint being written: every checkpoint on disk is whole
      latest = manager.latest_step()
      where = (f"{workdir} holds the checkpoints up to step {latest} and their log: continue with --resume"
               if latest is not None else f"{workdir} holds no checkpoint yet: a new run starts over")
      raise Interrupted(where) from None
    finally:
      manager.close()
    export(workdir, jax.device_get(state.params), config, int(state.step))
    plot(log_path, workdir / "training.png")
  return record
