"""A training run's directory: its lock, its checkpoints, and the rules for resuming it.

`hold` gives one run the workdir (an flock the OS releases however the process ends). Each checkpoint (Orbax, one
folder per step under `workdir/checkpoints`) holds the whole `TrainState` and, as JSON, the run's position: the
number of training examples, the steps per epoch, every setting, and the step's place in the data. A resumed run
(`restore_or_start`) continues from the latest checkpoint that reads back whole, with the same settings (those of
`train.config.RESUMABLE` may change, and are recorded) and the same data; damaged later checkpoints are moved aside
as evidence, and the JSON-lines log is cut back to the checkpoint. Orbax's stray output from a failing restore is
kept off the terminal (`_stray_output_hidden`).
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lpips_jax.errors import InputError
from lpips_jax.files import atomic_write
from lpips_jax.train.config import RESUMABLE, Config, flag

if TYPE_CHECKING:
  from lpips_jax.train.train import TrainState


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
      with _stray_output_hidden(Path(manager.directory) / str(step)):
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state))).state
      break
    except ResumeError:
      raise
    except Exception as e:
      damaged[step] = _reason(e)
  else:
    raise InputError(f"no checkpoint in {workdir / 'checkpoints'} reads back whole (" + "; ".join(
        f"{s}: {r}" for s, r in damaged.items()) + "): delete the folder to train from the start, or choose a new "
                     "--workdir")
  for s, reason in damaged.items():  # moved, not deleted: a later save of step s needs the name; the files are evidence
    _move_into(Path(manager.directory) / str(s), workdir / "damaged")
    note(f"checkpoint {s} in {workdir} is damaged ({reason}), moved to {workdir / 'damaged'}; resuming from "
         f"checkpoint {step}")
  manager.reload()
  if changed:
    note(f"resuming {workdir} at step {step} with changed settings: " + ", ".join(
        f"{flag(k)} {_text(old)} -> {_text(new)}" for k, (old, new) in changed.items()) + " (recorded in log.jsonl)")
  truncate_log(log_path, step)
  return restored, {"kind": "resume", "step": step, "changed": changed, "damaged": sorted(damaged)}


@contextlib.contextmanager
def _stray_output_hidden(checkpoint: Path, grace: float = 0.5) -> Iterator[None]:
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
      _drop_abandoned_orbax_reads(checkpoint)
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


def _drop_abandoned_orbax_reads(checkpoint: Path) -> None:
  """From now on, drop the "Exception ignored in: <coroutine ...>" reports of Orbax's abandoned reads (each a long
  traceback, printed whenever they are collected, possibly much later); every other report is printed as before.
  Reads that never started warn "coroutine ... was never awaited" when collected instead (seen with
  OMP_NUM_THREADS=1): those warnings are dropped too (this program awaits no coroutine of its own). And asyncio logs
  "Future exception was never retrieved" with the failed read's error (for a gathered read, a TensorStore spec of a
  hundred lines) when a future nobody awaited any more is collected: those that name `checkpoint`, the folder that
  failed to read, are dropped."""
  inside = os.path.join(checkpoint, "")  # its files' paths, not checkpoint 120's when 12 failed

  def unretrieved(record):
    message = record.getMessage()
    return "exception was never retrieved" in message and inside in message

  logging.getLogger("asyncio").addFilter(lambda record: not unretrieved(record))
  previous = sys.unraisablehook
  if getattr(previous, "drops_orbax_reads", False):
    return
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)

  def hook(report):
    code = getattr(report.object, "cr_code", None)
    if code is None or "orbax" not in code.co_filename:
      previous(report)

  hook.drops_orbax_reads = True
  sys.unraisablehook = hook


class ResumeError(InputError):
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
        f"{flag(k)} {_text(saved['settings'].get(k))} (now {_text(now[k])})" for k in fixed) + "; resume with the "
                      "run's "
                      "settings, or train with the new ones in another --workdir")
  if saved["examples"] != position["examples"]:
    raise ResumeError(f"cannot resume {workdir}: its run trained on {saved['examples']} examples, and --datasets "
                      f"under --dataroot now hold {position['examples']}; resume with the run's data, or train on "
                      f"the new data in another --workdir")
  total = position["steps_per_epoch"] * (now["epochs"] + now["epochs_decay"])
  if step > total:
    raise ResumeError(f"cannot resume {workdir} at step {step}: --epochs {now['epochs']} --epochs-decay "
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


def truncate_log(path: Path, step: int) -> None:
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
      raise InputError(f"{path}, line {i + 1}, is not a JSON record; repair or delete that line to resume") from None
    if record is not None and record.get("step", 0) <= step:
      kept.append(line)
  atomic_write(path, "".join(line + "\n" for line in kept).encode())
