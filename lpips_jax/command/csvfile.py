"""The command's CSV: rows written as they are computed, atomically completed, and resumed after a kill.

Any file name is quoted by the csv module and written in the bytes the file system gives it. With -o FILE the rows
go into FILE.partial, renamed to FILE when the run completes; `--resume` keeps the complete rows of a killed or
interrupted run and continues after them, only under the settings that computed them (recorded in FILE.json) and
only rows that are distances (finite, >= 0). One command at a time writes FILE (`one_writer`).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from lpips_jax.errors import InputError
from lpips_jax.files import atomic_write

HEADER = ["a", "b", "distance"]
CHUNK_ROWS = 4096  # CSV rows per write: each chunk is one os.write of whole rows


class Interrupted(KeyboardInterrupt):
  """Ctrl-C, with what the command leaves behind (its message)."""


@contextlib.contextmanager
def one_writer(out: Path) -> Iterator[None]:
  """Hold `out` for this command: an exclusive lock (flock) on the hidden `.OUT.lock` beside it, which the OS
  releases when the process ends, however it ends (a killed run leaves the file, unlocked). A second command writing
  `out` meanwhile is an InputError at once, before any work, rather than two runs interleaving their rows. The lock
  file is removed when the block ends."""
  import fcntl

  out.parent.mkdir(parents=True, exist_ok=True)  # as every output of the command: its folder is created
  path = out.with_name(f".{out.name}.lock")
  while True:
    lock = open(path, "a+")
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.seek(0)
      pid = lock.read().strip()
      lock.close()
      raise InputError(f"{out} is being written by another lpips-jax{f' (process {pid})' if pid else ''}: wait for "
                       f"it to end, or choose another -o") from None
    try:  # locked; but if its holder removed the file meanwhile, this lock is on a file no one else will open
      if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
        break
    except FileNotFoundError:
      pass
    lock.close()
  try:
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")  # for the message above: who writes the file
    lock.flush()
    yield
  finally:
    path.unlink(missing_ok=True)  # while still locked: a waiting opener then sees a removed file and starts over
    lock.close()


def settings_file(out: Path) -> Path:
  """Where the settings that computed `out` are recorded: `OUT.json`."""
  return out.with_name(out.name + ".json")


@contextlib.contextmanager
def csv_rows(out: Path | None, pairs: list[tuple[Path, Path]], *, resume: bool, settings: dict | None = None):
  """The CSV of a directory run: yields `(done, write)`, the distances already computed (with `resume`) and a
  function `write(pairs, values)` that appends rows.

  Without `out`, rows go to stdout. With it, they go to `OUT.partial`, each call one `os.write` of whole rows, no
  buffering, so a killed run leaves complete rows there (a row torn by a kill mid-write is dropped by --resume);
  when the block completes, the file is flushed to disk and renamed to `out`, so `out` is only ever a whole CSV.
  With `resume`, the rows of `OUT.partial` (or, if there is none, of `out`) must be the first pairs of this run, in
  order, computed with the same `settings` (`OUT.json`, written before the first row of a new run), and each a
  distance; the complete ones are kept and the run continues after them. Ctrl-C in the block is an `Interrupted`
  saying what was written. The caller holds `out` (`one_writer`).
  """
  count = 0

  def rows_of(pairs, values) -> bytes:
    nonlocal count
    count += len(values)
    return csv_bytes(formatted_rows(pairs, values))

  if out is None:
    write_stdout(csv_bytes([HEADER]))
    try:
      yield [], lambda pairs, values: write_stdout(rows_of(pairs, values))
    except KeyboardInterrupt:
      raise Interrupted(f"{count} rows were written") from None
    return
  partial = out.with_name(out.name + ".partial")
  partial.parent.mkdir(parents=True, exist_ok=True)  # as every output of the command: its folder is created
  source = next((p for p in (partial, out) if resume and p.exists()), None)
  done, prefix = _read_rows(source, pairs) if source else ([], csv_bytes([HEADER]))
  if source:  # after the rows: a file of other pairs says so first
    _check_settings(source, settings_file(out), settings)
  if source == partial:
    fd = os.open(partial, os.O_WRONLY)
    os.ftruncate(fd, len(prefix))
    os.lseek(fd, len(prefix), os.SEEK_SET)
  else:  # a new run: the partial file first, then its settings (a kill between leaves no row to misattribute)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    _write_all(fd, prefix)
    if settings is not None:
      atomic_write(settings_file(out), json.dumps(settings, indent=1, sort_keys=True).encode() + b"\n")
  count = len(done)
  try:
    yield done, lambda pairs, values: _write_all(fd, rows_of(pairs, values))
    os.fsync(fd)
  except KeyboardInterrupt:
    raise Interrupted(f"the {count} rows computed so far are in {partial}; continue with --resume") from None
  finally:
    os.close(fd)
  os.replace(partial, out)


def formatted_rows(pairs, values):
  return [(str(a), str(b), f"{v:.6f}") for (a, b), v in zip(pairs, values)]


def csv_bytes(rows) -> bytes:
  """CSV rows as the bytes of their text, file names encoded back as the file system gave them (`os.fsencode`:
  a name that is not UTF-8 is written as its own bytes)."""
  buffer = io.StringIO()
  plain, quoted = (csv.writer(buffer, lineterminator="\n", quoting=q) for q in (csv.QUOTE_MINIMAL, csv.QUOTE_ALL))
  for row in rows:
    # Python's csv (before 3.13) leaves a field with a carriage return unquoted when lines end in "\n".
    (quoted if any("\r" in field for field in row) else plain).writerow(row)
  return os.fsencode(buffer.getvalue())


def write_stdout(data: bytes) -> None:
  """Bytes to stdout, at once (after any text already buffered)."""
  sys.stdout.flush()
  sys.stdout.buffer.write(data)
  sys.stdout.buffer.flush()


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


def _check_settings(source: Path, record: Path, settings: dict | None) -> None:
  """An InputError naming each difference unless `record` holds `settings`: the rows of `source` were computed
  under them."""
  if settings is None:
    return
  try:
    saved = json.loads(record.read_text())
  except FileNotFoundError:
    raise InputError(f"{source} has no record of the settings that computed it ({record} is missing): its rows "
                     f"cannot be checked; run without --resume to compute them again") from None
  except (OSError, ValueError) as e:
    raise InputError(f"{record} is damaged ({type(e).__name__}); run without --resume to compute {source} again") \
        from None
  differ = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
  if differ:
    raise InputError(f"cannot resume {source}: it was computed with other settings: " + ", ".join(
        f"{k} {_setting(saved.get(k))} (now {_setting(settings.get(k))})" for k in differ) + "; resume with its "
        "settings, or write this run to another -o")


def _setting(value) -> str:
  return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _read_rows(path: Path, pairs: list[tuple[Path, Path]]) -> tuple[list[float], bytes]:
  """The distances of the complete rows of a previous run's CSV, and the bytes of its header and those rows."""
  text = os.fsdecode(path.read_bytes())
  records = list(csv.reader(io.StringIO(text, newline="")))
  header = os.fsdecode(csv_bytes([HEADER]))
  if not records or records[0] != HEADER:
    raise InputError(f"{path} is not a CSV written by lpips-jax (its first line is not a,b,distance); remove it "
                       f"or run without --resume")
  done, length = [], len(header)
  for k, record in enumerate(records[1:]):
    row = os.fsdecode(csv_bytes([record]))
    if k >= len(pairs) or not text.startswith(row, length) or len(record) != 3:
      break  # the torn last row of a killed run (or not ours: checked below)
    if (record[0], record[1]) != (str(pairs[k][0]), str(pairs[k][1])):
      raise InputError(f"{path} line {k + 2} is the pair {record[0]}, {record[1]}, but this run's pair {k + 1} is "
                       f"{pairs[k][0]}, {pairs[k][1]}: it was written for other inputs; remove it or choose "
                       f"another -o")
    try:
      value = float(record[2])
    except ValueError:
      break
    if not (math.isfinite(value) and value >= 0):
      raise InputError(f"{path} line {k + 2} has the distance {record[2]!r}, which is not a finite number >= 0: the "
                       f"file was edited or damaged; remove it, or run without --resume")
    done.append(value)
    length += len(row)
  if length < len(text) and text[length:].count("\n") > 1:  # more than one torn row: the file was edited
    raise InputError(f"{path} has rows after row {len(done) + 1} that are not this run's; remove it or choose "
                       f"another -o")
  return done, os.fsencode(text[:length])
