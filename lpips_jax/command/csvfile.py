"""The command's CSV: rows written as they are computed, atomically completed, and resumed after a kill.

Any file name is quoted by the csv module and written in the bytes the file system gives it. With -o FILE the rows
go into FILE.partial, renamed to FILE when the run completes; `--resume` keeps the complete rows of a killed or
interrupted run and continues after them.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
from pathlib import Path

from lpips_jax.errors import InputError

HEADER = ["a", "b", "distance"]
CHUNK_ROWS = 4096  # CSV rows per write: each chunk is one os.write of whole rows


class Interrupted(KeyboardInterrupt):
  """Ctrl-C, with what the command leaves behind (its message)."""


@contextlib.contextmanager
def csv_rows(out: Path | None, pairs: list[tuple[Path, Path]], *, resume: bool):
  """The CSV of a directory run: yields `(done, write)`, the distances already computed (with `resume`) and a
  function `write(pairs, values)` that appends rows.

  Without `out`, rows go to stdout. With it, they go to `OUT.partial`, each call one `os.write` of whole rows, no
  buffering, so a killed run leaves complete rows there (a row torn by a kill mid-write is dropped by --resume);
  when the block completes, the file is flushed to disk and renamed to `out`, so `out` is only ever a whole CSV.
  With `resume`, the rows of `OUT.partial` (or, if there is none, of `out`) must be the first pairs of this run, in
  order; the complete ones are kept and the run continues after them. Ctrl-C in the block is an `Interrupted`
  saying what was written.
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
  if source == partial:
    fd = os.open(partial, os.O_WRONLY)
    os.ftruncate(fd, len(prefix))
    os.lseek(fd, len(prefix), os.SEEK_SET)
  else:
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    _write_all(fd, prefix)
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
      raise InputError(f"{path} row {k + 2} is the pair {record[0]}, {record[1]}, but this run's pair {k + 1} is "
                         f"{pairs[k][0]}, {pairs[k][1]}: it was written for other inputs; remove it or choose "
                         f"another -o")
    try:
      done.append(float(record[2]))
    except ValueError:
      break
    length += len(row)
  if length < len(text) and text[length:].count("\n") > 1:  # more than one torn row: the file was edited
    raise InputError(f"{path} has rows after row {len(done) + 1} that are not this run's; remove it or choose "
                       f"another -o")
  return done, os.fsencode(text[:length])
