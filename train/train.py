"""Training LPIPS on 2AFC judgments (SPEC §3): the optimiser, a sharded train step, and the training loop.

The policy is optax's: Adam(1e-4, b1 0.5, b2 0.999) on the trainable leaves, zero updates on the frozen ones, and
the projection of the heads (and by default SqueezeNet's 1x1 trunk kernels, as the official `clamp_weights`) onto
non-negative weights, last in the chain. The state is a `TrainState` value; `train_step` maps (state, batch, rng) to
(state, metrics) and is jitted over a 1-D "data" mesh of all local devices (batch sharded, state replicated).
`train_and_evaluate` runs a whole training: data, checkpoints (Orbax), logs, plot and export.
"""
from __future__ import annotations

import functools
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lpips_jax.weights import save
from lpips_jax.train.config import DTYPES, Config
from lpips_jax.train.data import batches, epoch_order, prefetch, read_2afc
from lpips_jax.train.evaluate import evaluate_2afc, local_mesh
from lpips_jax.train.model import init_params, loss_fn

# Dynamic loss scaling for float16: start high, halve on overflow (and skip that step), double after a run of
# finite steps (the usual scheme of NVIDIA apex / torch.amp.GradScaler).
LOSS_SCALE_INIT = 2.0 ** 15
LOSS_SCALE_PERIOD = 2000


class TrainState(NamedTuple):
  params: Any  # {"lpips": lpips_jax params, "rank": ranking head}, float32
  opt_state: optax.OptState
  step: jax.Array  # int32 []: steps taken; the data position is divmod(step, steps_per_epoch)
  rng: jax.Array  # uint32 [2]: the run's dropout key; step s uses fold_in(rng, s)
  loss_scale: jax.Array  # float32 []: the dynamic loss scale (float16 training; 1 otherwise)
  good_steps: jax.Array  # int32 []: finite steps since the loss scale last changed


def lr_schedule(lr: float, steps_per_epoch: int, epochs: int, epochs_decay: int) -> optax.Schedule:
  """The official schedule over steps: `lr` for epochs 1..epochs+1, then `lr / epochs_decay` less after each
  later epoch (defaults: 1e-4 for epochs 1-6, then 8e-5, 6e-5, 4e-5, 2e-5; SPEC §3.3)."""
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


def init_state(params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jnp.asarray(rng, jnp.uint32),
                    jnp.ones((), jnp.float32), jnp.zeros((), jnp.int32))


def freeze(params, mode: str):
  """`params` with gradients stopped at the frozen leaves, so only the trainable subtree is differentiated."""
  labels = trainable_labels(params, mode)
  return jax.tree.map(lambda p, label: p if label == "train" else jax.lax.stop_gradient(p), params, labels)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(state: TrainState, batch: dict, rng: jax.Array | None, *, tx: optax.GradientTransformation,
               mode: str = "lin", dtype=None) -> tuple[TrainState, dict]:
  """One optimiser step on a batch (see `train.model.loss_fn` for its layout).

  rng: this step's dropout key (`fold_in(state.rng, step)` in training), or None for no dropout.
  dtype: the trunk's compute dtype (None: float32); float16 scales the loss dynamically and skips steps whose
  gradients overflow. Returns the new state and metrics {"loss", "acc", "grad_norm", "loss_scale", "finite"}.
  """
  f16 = dtype == jnp.float16

  def objective(params):
    loss, metrics = loss_fn(freeze(params, mode), batch, dropout_rng=rng, dtype=dtype)
    return (loss * state.loss_scale if f16 else loss), metrics

  grads, metrics = jax.grad(objective, has_aux=True)(state.params)
  if f16:
    grads = jax.tree.map(lambda g: g / state.loss_scale, grads)
  with jax.numpy_dtype_promotion("standard"):  # optax's bias correction raises a float to an int32 power
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1, state.rng,
                   state.loss_scale, state.good_steps)
  finite = jnp.ones((), bool)
  if f16:
    finite = _all_finite(grads)
    grow = state.good_steps + 1 >= LOSS_SCALE_PERIOD
    kept = jax.tree.map(lambda a, b: jnp.where(finite, a, b), (new.params, new.opt_state),
                        (state.params, state.opt_state))
    new = new._replace(params=kept[0], opt_state=kept[1],
                       loss_scale=jnp.where(finite, jnp.where(grow, state.loss_scale * 2, state.loss_scale),
                                            jnp.maximum(state.loss_scale / 2, 1.0)),
                       good_steps=jnp.where(finite & ~grow, state.good_steps + 1, 0))
  return new, {**metrics, "grad_norm": optax.global_norm(grads), "loss_scale": state.loss_scale, "finite": finite}


def make_train_step(tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, *, mode: str, dtype=None):
  """`train_step` jitted data-parallel over `mesh`'s "data" axis (`local_mesh()`): batch sharded, state replicated
  and donated. On a mesh with Explicit axes, place the state first: `jax.device_put(state, NamedSharding(mesh, P()))`."""
  replicated, data = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
  return jax.jit(functools.partial(train_step, tx=tx, mode=mode, dtype=dtype),
                 in_shardings=(replicated, data, replicated), out_shardings=(replicated, replicated),
                 donate_argnums=0)


# -- the training run ----------------------------------------------------------------------------------------------

def _checkpoints(workdir: Path, keep: int):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(workdir.resolve() / "checkpoints", options=options)


def _save(manager, state: TrainState, position: dict) -> None:
  import orbax.checkpoint as ocp

  manager.save(position["step"], args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         position=ocp.args.JsonSave(position)))


def _restore(manager, like: TrainState) -> tuple[TrainState, dict]:
  import orbax.checkpoint as ocp

  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like),
                                                           position=ocp.args.JsonRestore()))
  return restored.state, restored.position


def _write(log, record: dict) -> None:
  log.write(json.dumps(record) + "\n")
  log.flush()


def _truncate_log(path: Path, step: int) -> None:
  """Drop log records written after the checkpoint a run resumes from (they will be written again)."""
  if path.exists():
    records = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in records))


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
  for name in (evals[0]["val"] if evals else []):
    ax_2afc.plot([r["step"] for r in evals], [100 * r["val"][name] for r in evals], marker=".", label=name)
  if evals:
    ax_2afc.plot([r["step"] for r in evals], [100 * r["val_mean"] for r in evals], "k-", lw=2, label="mean")
    ax_2afc.legend(fontsize="small")
  ax_2afc.set(xlabel="step", ylabel="2AFC score (%)", title="validation 2AFC")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def _evaluate(params, val: dict, config: Config, mesh, step: int, epoch: int) -> dict:
  scores = {name: evaluate_2afc(params["lpips"], data, batch_size=config.eval_batch_size, mesh=mesh,
                                dtype=DTYPES[config.dtype], workers=config.workers)[0] for name, data in val.items()}
  mean = float(np.mean(list(scores.values()))) if scores else None
  return {"kind": "eval", "step": step, "epoch": epoch, "val": scores, "val_mean": mean}


def train_and_evaluate(config: Config, workdir: str | Path, *, resume: bool = False, progress: bool = False) -> dict:
  """Train LPIPS as `config` says, writing to `workdir`:
  `log.jsonl` (config, train lines every `log_every` steps, eval lines before training and after each epoch),
  `training.png`, `checkpoints/` (Orbax; every `checkpoint_every` steps and at the end), and at the end
  `lpips.safetensors` (the metric, for `lpips_jax.load(path)`) and `rank.safetensors` (the ranking head).

  `resume` continues from the latest checkpoint exactly (same parameters as an uninterrupted run).
  Returns the last eval record.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  root = Path(config.dataroot)
  data = read_2afc([root / name for name in config.datasets])
  val = {name: read_2afc([root / name]) for name in config.val_datasets}
  n = len(data.judge)
  steps_per_epoch = math.ceil(n / config.batch_size)
  total_epochs = config.epochs + config.epochs_decay
  total_steps = steps_per_epoch * total_epochs
  mesh = local_mesh()
  padded = math.ceil(config.batch_size / mesh.size) * mesh.size  # every device gets an equal share
  dtype = DTYPES[config.dtype]

  key = jax.random.PRNGKey(config.seed)
  params = init_params(jax.random.fold_in(key, 0), net=config.net, version=config.version, mode=config.mode,
                       heads_init=config.heads_init)
  schedule = lr_schedule(config.lr, steps_per_epoch, config.epochs, config.epochs_decay)
  tx = make_optimizer(params, mode=config.mode, schedule=schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                      nonneg=config.nonneg)
  replicated = NamedSharding(mesh, PartitionSpec())
  state = jax.device_put(init_state(params, tx, jax.random.fold_in(key, 1)), replicated)
  if dtype == jnp.float16:
    state = state._replace(loss_scale=jax.device_put(jnp.float32(LOSS_SCALE_INIT), replicated))

  position = {"examples": n, "batch_size": config.batch_size, "seed": config.seed,
              "steps_per_epoch": steps_per_epoch}
  manager = _checkpoints(workdir, config.keep_checkpoints)
  log_path = workdir / "log.jsonl"
  if manager.latest_step() is not None:
    if not resume:
      raise FileExistsError(f"{workdir} already holds checkpoints (latest step {manager.latest_step()}): pass "
                            f"--resume to continue that run, or choose a new --workdir")
    state, saved = _restore(manager, state)
    changed = {k: (saved.get(k), v) for k, v in position.items() if saved.get(k) != v}
    if changed:
      raise ValueError(f"cannot resume: the checkpoint was written with different data or settings "
                       f"(saved, now): {changed}")
    _truncate_log(log_path, int(state.step))
  elif log_path.exists():
    log_path.unlink()  # a fresh run (or one killed before its first checkpoint) starts a new log
  step = int(state.step)
  step_fn = make_train_step(tx, mesh, mode=config.mode, dtype=dtype)
  data_sharding = NamedSharding(mesh, PartitionSpec("data"))
  dropout_key = np.asarray(state.rng)

  record = None
  with open(log_path, "a") as log, ThreadPoolExecutor(config.workers) as pool:
    if step == 0:
      _write(log, {"kind": "config", "step": 0, **{k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in vars(config).items()}, "devices": mesh.size})
      record = _evaluate(state.params, val, config, mesh, 0, 0)
      _write(log, record)
    pending, started = [], time.perf_counter()
    for epoch in range(step // steps_per_epoch, total_epochs):
      order = epoch_order(n, config.seed, epoch)[(step - epoch * steps_per_epoch) * config.batch_size:]
      stream = prefetch(batches(data, order, config.batch_size, pad_to=padded, pool=pool), config.prefetch)
      for batch in stream:
        rng = jax.random.fold_in(dropout_key, step) if config.dropout else None
        state, metrics = step_fn(state, jax.device_put(batch, data_sharding), rng)
        step += 1
        pending.append(metrics)
        if step % config.log_every == 0 or step % steps_per_epoch == 0:
          values = jax.device_get(pending)
          bad = [i for i, m in enumerate(values) if not np.isfinite(m["loss"])]
          if bad:
            hint = "; or --dtype bfloat16, which has float32's range" if config.dtype == "float16" else ""
            raise FloatingPointError(
                f"the training loss is {values[bad[0]]['loss']} at step {step - len(values) + bad[0] + 1}: the "
                f"weights diverged or the forward pass overflowed; lower --lr{hint}")
          elapsed, started = time.perf_counter() - started, time.perf_counter()
          loss = float(np.mean([m["loss"] for m in values]))
          _write(log, {"kind": "train", "step": step, "epoch": step / steps_per_epoch, "loss": loss,
                       "acc": float(np.mean([m["acc"] for m in values])), "lr": float(schedule(step - 1)),
                       "grad_norm": float(np.mean([m["grad_norm"] for m in values])),
                       "loss_scale": float(values[-1]["loss_scale"]),
                       "skipped": int(sum(not m["finite"] for m in values)),
                       "steps_per_s": len(values) / elapsed})
          pending = []
          if progress:
            print(f"step {step}/{total_steps}  loss {loss:.4f}", flush=True)
        if step % steps_per_epoch == 0:
          record = _evaluate(state.params, val, config, mesh, step, step // steps_per_epoch)
          _write(log, record)
          plot(log_path, workdir / "training.png")
          if progress and record["val_mean"] is not None:
            print(f"epoch {record['epoch']}: 2AFC " + ", ".join(
                f"{k} {100 * v:.2f}" for k, v in record["val"].items()), flush=True)
        if step % config.checkpoint_every == 0 or step == total_steps:
          _save(manager, state, {**position, "step": step, "epoch": step // steps_per_epoch,
                                 "batch": step % steps_per_epoch})
  manager.wait_until_finished()
  manager.close()
  params = jax.device_get(state.params)
  # One metadata entry: safetensors writes several in a random order, and the file should depend on its content only.
  meta = {"training": json.dumps({"net": config.net, "version": config.version, "mode": config.mode, "steps": step,
                                  "dtype": config.dtype, "seed": config.seed}, sort_keys=True)}
  save(workdir / "lpips.safetensors", params["lpips"], metadata=meta)
  save(workdir / "rank.safetensors", params["rank"], metadata=meta)
  plot(log_path, workdir / "training.png")
  return record
