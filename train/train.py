"""Training LPIPS on 2AFC judgments (docs/official.md §3): the optimiser, a sharded train step, and the training loop.

The policy is optax's: Adam(1e-4, b1 0.5, b2 0.999) on the trainable leaves, zero updates on the frozen ones, and
the projection of the heads (and by default SqueezeNet's 1x1 trunk kernels, as the official `clamp_weights`) onto
non-negative weights, last in the chain. The state is a `TrainState` value; `train_step` maps (state, batch, rng) to
(state, metrics) and is jitted over a 1-D "data" mesh of all local devices (`local_mesh`; batch sharded, state
replicated). `train_and_evaluate`, last, runs a whole training from the pieces before it, as flax's
examples/imagenet does: create the state, restore or start, step, evaluate, log, checkpoint (Orbax), plot, export.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import sys
import tempfile
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

from lpips_jax.scoring import local_mesh as local_mesh  # the step's mesh (bench/train_step.py imports it here)
from lpips_jax.files import atomic_write
from lpips_jax.scoring import padded_batch_size
from lpips_jax.weights import save
from lpips_jax.train.config import DTYPES, RESUMABLE, Config
from lpips_jax.train.data import TwoAFC, batches, epoch_order, prefetch, read_2afc
from lpips_jax.train.evaluate import evaluate_2afc
from lpips_jax.train.model import init_params, loss_fn

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
  count = jnp.sum(batch["weight"])  # loss_fn's metrics are means over the real examples
  return new, {"loss_sum": metrics["loss"] * count, "acc_sum": metrics["acc"] * count, "count": count,
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


@contextlib.contextmanager
def hold(workdir: Path) -> Iterator[None]:
  """Hold `workdir` for one run: an exclusive lock (flock) on `workdir/lock`, which the OS releases when the process
  ends, however it ends (SIGKILL too). A second run in the directory raises BlockingIOError at once."""
  import fcntl

  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "lock", "a+") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.seek(0)
      pid = lock.read().strip()
      raise BlockingIOError(f"{workdir} is in use by another lpips-jax train{f' (process {pid})' if pid else ''}: "
                            f"wait for it to end, or choose another --workdir") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")  # for the message above: who holds the directory
    lock.flush()
    yield


def checkpoint_manager(workdir: Path, keep: int):
  """Orbax checkpoints of the whole state under `workdir/checkpoints`, one folder per step, the `keep` latest."""
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(workdir.resolve() / "checkpoints", options=options)


def run_position(config: Config, examples: int) -> dict:
  """What a checkpoint records beside the state (JSON), and what a resumed run must match: the number of training
  examples, the steps per epoch and every setting (the config, tuples as lists)."""
  return {"examples": examples, "steps_per_epoch": math.ceil(examples / config.batch_size),
          "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}}


def restore_or_start(manager, state: TrainState, position: dict, workdir: Path, *, resume: bool,
                     note: Callable[[str], None]) -> tuple[TrainState, dict | None]:
  """The state to train from, and for a resumed run the log record saying so: `state` for a fresh run, which
  starts a new log, or with `resume` the state of the latest checkpoint that reads back whole, the log cut back to
  it. Damaged later checkpoints (an unreadable array file or position JSON) are moved to `workdir/damaged/`, with
  a `note`; settings of `RESUMABLE` that differ from the checkpoint's are noted and recorded.

  `position`: `run_position` of this run. Raises FileExistsError for checkpoints without `resume`, and ValueError
  if no checkpoint reads back, the data's size changed, another setting differs from the checkpoint's, or the
  checkpoint is past the run's last step.
  """
  import orbax.checkpoint as ocp

  log_path, steps = workdir / "log.jsonl", sorted(manager.all_steps(), reverse=True)
  if not steps:
    if resume:
      note(f"{workdir} holds no checkpoint to resume: starting a new run")
    log_path.unlink(missing_ok=True)  # a fresh run (or one killed before its first checkpoint) starts a new log
    return state, None
  if not resume:
    raise FileExistsError(f"{workdir} already holds checkpoints (latest step {steps[0]}): pass --resume to "
                          f"continue that run, or choose a new --workdir")
  damaged = {}
  for step in steps:
    try:  # the position first: the settings are compared before the state tree is read
      saved = manager.restore(step, args=ocp.args.Composite(position=ocp.args.JsonRestore())).position
      changed = _check_resumable(saved, position, workdir, step)
      with _stray_output_hidden():
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state))).state
      break
    except ResumeError:
      raise
    except Exception as e:
      damaged[step] = _reason(e)
  else:
    raise ValueError(f"no checkpoint in {workdir / 'checkpoints'} reads back whole (" + "; ".join(
        f"{s}: {r}" for s, r in damaged.items()) + "): delete the folder to train from the start, or choose a new "
                     "--workdir")
  for s, reason in damaged.items():  # moved, not deleted: a later save of step s needs the name; the files are evidence
    _move_into(Path(manager.directory) / str(s), workdir / "damaged")
    note(f"checkpoint {s} in {workdir} is damaged ({reason}), moved to {workdir / 'damaged'}; resuming from "
         f"checkpoint {step}")
  manager.reload()
  if changed:
    note(f"resuming {workdir} at step {step} with changed settings: " + ", ".join(
        f"--{k} {_text(old)} -> {_text(new)}" for k, (old, new) in changed.items()) + " (recorded in log.jsonl)")
  _truncate_log(log_path, step)
  return restored, {"kind": "resume", "step": step, "changed": changed, "damaged": sorted(damaged)}


@contextlib.contextmanager
def _stray_output_hidden(grace: float = 0.5) -> Iterator[None]:
  """Hide what a failing Orbax restore prints from its threads: when one array file fails to read, Orbax closes its
  event loop while tensorstore still completes the other reads, whose callbacks then print "Event loop is closed"
  tracebacks, and the abandoned coroutines print again when they are collected; dozens of tracebacks, some after
  the exception has reached us. Standard error (the file descriptor: tensorstore writes from C++ threads) goes to a
  temporary file; after a failure the stragglers get `grace` seconds and a collection, and their output is dropped;
  after a success it is written out."""
  sys.stderr.flush()
  saved, capture = os.dup(2), tempfile.TemporaryFile()
  os.dup2(capture.fileno(), 2)
  failed = True
  try:
    yield
    failed = False
  finally:
    if failed:
      _drop_abandoned_orbax_reads()
      gc.collect()
      time.sleep(grace)
      gc.collect()
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    if not failed:
      capture.seek(0)
      sys.stderr.buffer.write(capture.read())
      sys.stderr.flush()
    capture.close()


def _drop_abandoned_orbax_reads() -> None:
  """From now on, drop the "Exception ignored in: <coroutine ...>" reports of Orbax's abandoned reads (each a long
  traceback, printed whenever they are collected, possibly much later); every other report is printed as before."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_orbax_reads", False):
    return

  def hook(report):
    code = getattr(report.object, "cr_code", None)
    if code is None or "orbax" not in code.co_filename:
      previous(report)

  hook.drops_orbax_reads = True
  sys.unraisablehook = hook


class ResumeError(ValueError):
  """A checkpoint that reads back but was written for another run: other settings, other data, or past the end."""


def _check_resumable(saved: dict, position: dict, workdir: Path, step: int) -> dict[str, list]:
  """{setting: [saved, now]} of the RESUMABLE settings that differ between checkpoint `step` (its position JSON
  `saved`) and this run (`position`); ResumeError naming each other setting that differs, a change in the number of
  examples, or a run now shorter than the checkpoint's step."""
  now = position["settings"]
  differ = [k for k in now if saved["settings"].get(k) != now[k]]
  fixed = [k for k in differ if k not in RESUMABLE]
  if fixed:
    raise ResumeError(f"cannot resume {workdir} (checkpoint {step}): it was trained with other settings: " + ", ".join(
        f"--{k} {_text(saved['settings'].get(k))} (now {_text(now[k])})" for k in fixed) + "; resume with the run's "
                      "settings, or train with the new ones in another --workdir")
  if saved["examples"] != position["examples"]:
    raise ResumeError(f"cannot resume {workdir}: its run trained on {saved['examples']} examples, and --datasets "
                      f"under --dataroot now hold {position['examples']}; resume with the run's data, or train on "
                      f"the new data in another --workdir")
  total = position["steps_per_epoch"] * (now["epochs"] + now["epochs_decay"])
  if step > total:
    raise ResumeError(f"cannot resume {workdir} at step {step}: --epochs {now['epochs']} --epochs_decay "
                      f"{now['epochs_decay']} end the run at step {total}; ask for at least the "
                      f"{step / position['steps_per_epoch']:g} epochs it has trained")
  return {k: [saved["settings"].get(k), now[k]] for k in differ}


def _text(value) -> str:
  """A setting as its flag's value(s) are written."""
  if isinstance(value, list):
    return " ".join(map(str, value)) if value else "(none)"
  return str(value)


def _reason(e: BaseException) -> str:
  """One line of why a checkpoint did not read back: the first line of the innermost error, shortened."""
  while e.__cause__ is not None:
    e = e.__cause__
  line = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
  line = f"{type(e).__name__}: {line}" if line else type(e).__name__
  return line if len(line) <= 200 else line[:197] + "..."


def _move_into(path: Path, folder: Path) -> None:
  folder.mkdir(exist_ok=True)
  target, n = folder / path.name, 1
  while target.exists():
    target, n = folder / f"{path.name}.{n}", n + 1
  path.rename(target)


def save_checkpoint(manager, state: TrainState, position: dict) -> None:
  """Save `state` as checkpoint `state.step`, with `position` (`run_position`) and where in the data that step is
  (JSON)."""
  import orbax.checkpoint as ocp

  step = int(state.step)
  epoch, batch = divmod(step, position["steps_per_epoch"])
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), position=ocp.args.JsonSave(
      {**position, "step": step, "epoch": epoch, "batch": batch})))


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


def check_finite(metrics: list[dict], step: int, dtype: str) -> None:
  """Raise FloatingPointError naming the first step whose loss is not finite; `metrics` end with step `step`'s."""
  for i, m in enumerate(metrics):
    loss = float(m["loss_sum"]) / float(m["count"])
    if not math.isfinite(loss):
      hint = "; or --dtype bfloat16, which has float32's range" if dtype == "float16" else ""
      raise FloatingPointError(f"the training loss is {loss} at step {step - len(metrics) + i + 1}: the weights "
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


def _truncate_log(path: Path, step: int) -> None:
  """Drop log records written after the checkpoint a run resumes from (they will be written again), atomically.
  A last line torn by a kill is dropped too; any other line that is not JSON is an error naming it."""
  if not path.exists():
    return
  lines, kept = path.read_text(errors="replace").splitlines(), []
  for i, line in enumerate(lines):
    try:
      record = json.loads(line) if line.strip() else None
    except ValueError:
      if i == len(lines) - 1:
        break
      raise ValueError(f"{path}, line {i + 1}, is not a JSON record; repair or delete that line to resume") from None
    if record is not None and record.get("step", 0) <= step:
      kept.append(line)
  atomic_write(path, "".join(line + "\n" for line in kept).encode())


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
      raise Interrupted(f"interrupted; {where}") from None
    finally:
      manager.close()
    export(workdir, jax.device_get(state.params), config, int(state.step))
    plot(log_path, workdir / "training.png")
  return record
