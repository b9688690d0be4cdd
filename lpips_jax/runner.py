"""The runner every command goes through: `lpips-jax`, `lpips-jax convert`, `lpips-jax train`, `lpips-jax eval`.

It decides what a command's failure looks like, the same way for all four:
  - bad input (`lpips_jax.errors.InputError`, and `OSError`: a missing, unreadable or unwritable file) is one
    line `PROG: error: ...` and exit status 1;
  - running out of memory (host `MemoryError`, or XLA's RESOURCE_EXHAUSTED) is one line naming the fix, status 1;
  - Ctrl-C is one line `PROG: interrupted[; what was kept]` and status 130 (128 + SIGINT), at any point, the
    imports of JAX included;
  - anything else is a bug: it propagates with its traceback.
Argument errors are argparse's one line and status 2 (`Parser`). The module imports nothing heavy, so a Ctrl-C
while JAX is being imported is handled too.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence

from lpips_jax.errors import InputError

# What each command needs beyond the base install, and the extra that provides it.
EXTRAS = {"train": "jax-lpips[train]"}


class Parser(argparse.ArgumentParser):
  """argparse whose errors are one line ending in where the options are listed, and whose long options may also be
  spelled with underscores (`--batch_size` for `--batch-size`): the spelling of older READMEs and scripts."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

  def parse_known_args(self, args=None, namespace=None):
    args = sys.argv[1:] if args is None else list(args)
    end = args.index("--") if "--" in args else len(args)  # after "--", every argument is a value
    return super().parse_known_args([_dashed(a) for a in args[:end]] + args[end:], namespace)


def _dashed(arg: str) -> str:
  """`--batch_size=8` -> `--batch-size=8`; any other argument unchanged (values, file names, `--`)."""
  match = re.fullmatch(r"(--[A-Za-z0-9][A-Za-z0-9_-]*)(=.*)?", arg, re.DOTALL)
  if not match:
    return arg
  return match[1].replace("_", "-") + (match[2] or "")


def run(prog: str, main: Callable[[list[str]], object], argv: Sequence[str] | None = None, *,
        oom_hint: str = "lower --batch-size") -> int:
  """`main(argv)` as a command: its exit status (0 unless it returns an int), with the failures above as one line."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    status = main(argv)
    return status if isinstance(status, int) else 0
  except (InputError, OSError) as e:
    _line(f"{prog}: error: {_one_line(e)}")
    return 1
  except MemoryError:
    _line(f"{prog}: error: out of memory; {oom_hint}")
    return 1
  except KeyboardInterrupt as e:
    _line(f"{prog}: interrupted{f'; {_one_line(e)}' if str(e) else ''}")
    return 130
  except Exception as e:  # XLA's out-of-memory is a JaxRuntimeError; JAX is imported only if it is in use
    if type(e).__name__ == "JaxRuntimeError" and "RESOURCE_EXHAUSTED" in str(e):
      _line(f"{prog}: error: out of memory on the device; {oom_hint}")
      return 1
    raise


def require(command: str, modules: Sequence[str], extra: str) -> None:
  """An InputError, before any work, unless every module can be imported: `pip install "EXTRA"` says the fix."""
  missing = [m for m in modules if not _importable(m)]
  if missing:
    raise InputError(f"{command} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                     f"installed: pip install \"{extra}\"")


def exit(status: int) -> None:  # noqa: A001 (the module's own sys.exit)
  """End the process with `status`. After Ctrl-C (130) without Python's shutdown: an XLA compilation cut short can
  crash the interpreter's teardown (a SIGSEGV after the line is printed), and nothing is left to flush but the
  standard streams."""
  if status == 130:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
  sys.exit(status)


def note(message: str) -> None:
  """A one-line note on stderr, above a progress bar if one is drawn."""
  _line(f"note: {message}")


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a parent package missing, or a module hidden as None in sys.modules
    return False


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def _line(text: str) -> None:
  try:  # above a progress bar, if one is drawn
    from tqdm import tqdm
    tqdm.write(text, file=sys.stderr)
  except ImportError:
    print(text, file=sys.stderr)
  sys.stderr.flush()
