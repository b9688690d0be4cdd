"""Every command fails, stops and exits the same way, through `lpips_jax.runner`; flags have one spelling."""
import argparse
import importlib
import sys
from pathlib import Path

import pytest

from lpips_jax import runner
from lpips_jax.errors import InputError

IMAGES = Path(__file__).resolve().parents[1] / "lpips_jax" / "images"
REF, P0 = str(IMAGES / "ex_ref.png"), str(IMAGES / "ex_p0.png")

# (command, its module, the function its main calls once the flags are parsed, flags that reach that call)
COMMANDS = [
    ("lpips-jax", "lpips_jax.command", "run", [REF, P0]),
    ("lpips-jax convert", "lpips_jax.convert.__main__", "sdist", ["sdist", "--out", "{tmp}"]),
    ("lpips-jax train", "lpips_jax.train.train", "train_and_evaluate", ["--workdir", "{tmp}"]),
    ("lpips-jax eval", "lpips_jax.train.eval_main", "score", ["--dataroot", "{tmp}"]),
]
MAINS = {"lpips-jax": "lpips_jax.command", "lpips-jax convert": "lpips_jax.convert.__main__",
         "lpips-jax train": "lpips_jax.train.main", "lpips-jax eval": "lpips_jax.train.eval_main"}


def raising(error: BaseException):
  def call(*args, **kwargs):
    raise error
  return call


def run_command(prog, module, name, argv, error, monkeypatch, tmp_path):
  """The command's exit status when the function its main reaches raises `error`."""
  monkeypatch.setattr(importlib.import_module(module), name, raising(error))
  return importlib.import_module(MAINS[prog]).main([a.replace("{tmp}", str(tmp_path)) for a in argv])


@pytest.mark.parametrize("prog,module,name,argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_fails_stops_and_exits_through_the_one_runner(prog, module, name, argv, monkeypatch,
                                                                     tmp_path, capsys):
  # Bad input: one line naming the problem and the fix, status 1.
  bad = InputError("the thing is wrong;\n  do this instead")
  assert run_command(prog, module, name, argv, bad, monkeypatch, tmp_path) == 1
  assert capsys.readouterr().err == f"{prog}: error: the thing is wrong; do this instead\n"
  # A file that cannot be read or written is bad input too.
  assert run_command(prog, module, name, argv, PermissionError(13, "Permission denied", "out.csv"), monkeypatch,
                     tmp_path) == 1
  assert capsys.readouterr().err == f"{prog}: error: [Errno 13] Permission denied: 'out.csv'\n"
  # Ctrl-C: one line, with what was kept, and status 130 (128 + SIGINT).
  assert run_command(prog, module, name, argv, KeyboardInterrupt(), monkeypatch, tmp_path) == 130
  err = capsys.readouterr().err
  assert err.startswith(f"{prog}: interrupted") and err.count("\n") == 1, err
  assert run_command(prog, module, name, argv, KeyboardInterrupt("the rows so far are in out.csv.partial"),
                     monkeypatch, tmp_path) == 130
  assert capsys.readouterr().err == f"{prog}: interrupted; the rows so far are in out.csv.partial\n"
  # Out of memory: one line naming the fix.
  assert run_command(prog, module, name, argv, MemoryError(), monkeypatch, tmp_path) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"{prog}: error: out of memory; ") and err.count("\n") == 1
  # An internal error is a bug: it keeps its type and traceback, and is not dressed up as bad input.
  with pytest.raises(ZeroDivisionError) as bug:
    run_command(prog, module, name, argv, ZeroDivisionError("a bug"), monkeypatch, tmp_path)
  assert bug.traceback[-1].name == "call"  # raised where the bug is, not re-raised by the runner
  # So is a ValueError that is not an InputError (e.g. from numpy inside the computation).
  with pytest.raises(ValueError, match="not bad input"):
    run_command(prog, module, name, argv, ValueError("not bad input"), monkeypatch, tmp_path)
  assert capsys.readouterr().err == ""


def test_xla_out_of_memory_is_one_line():
  class JaxRuntimeError(RuntimeError):  # the name XLA's errors carry
    pass

  status = runner.run("lpips-jax", raising(JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4 GB")),
                      [], oom_hint="lower --batch-size")
  assert status == 1
  with pytest.raises(JaxRuntimeError):  # any other XLA error is not out of memory
    runner.run("lpips-jax", raising(JaxRuntimeError("INTERNAL: something else")), [])


def parsers() -> dict[str, argparse.ArgumentParser]:
  """Every command's parser, subcommands included."""
  from lpips_jax import command
  from lpips_jax.convert import __main__ as convert
  from lpips_jax.train import eval_main, main

  found = {"lpips-jax": command.parser(), "lpips-jax train": main.parser(), "lpips-jax eval": eval_main.parser()}
  for action in convert.parser()._actions:
    if isinstance(action, argparse._SubParsersAction):
      found.update({f"lpips-jax convert {name}": sub for name, sub in action.choices.items()})
  return found


def test_every_flag_of_every_command_is_spelled_with_dashes():
  flags = {prog: [o for a in p._actions for o in a.option_strings if o.startswith("--")]
           for prog, p in parsers().items()}
  assert len(flags) == 8 and all(flags.values())
  for prog, options in flags.items():
    assert [o for o in options if "_" in o] == [], prog


@pytest.mark.parametrize("prog,dashed", [
    ("lpips-jax", ["--batch-size", "8", "--max-pixels=100", "--spatial-max", "2"]),
    ("lpips-jax train", ["--workdir", "w", "--batch-size", "8", "--epochs-decay", "2", "--heads-init",
                         "pretrained", "--val-datasets", "a", "b", "--log-every=3"]),
    ("lpips-jax eval", ["--batch-size", "8"]),
])
def test_old_underscore_spellings_parse_as_the_dashed_flags(prog, dashed):
  parser = parsers()[prog]
  positional = [REF, P0] if prog == "lpips-jax" else []
  underscored = [a.replace("-", "_").replace("__", "--", 1) if a.startswith("--") else a for a in dashed]
  assert underscored != dashed
  assert vars(parser.parse_args(positional + underscored)) == vars(parser.parse_args(positional + dashed))


def test_values_and_file_names_are_never_rewritten():
  parser = runner.Parser(prog="p")
  parser.add_argument("--out")
  parser.add_argument("paths", nargs="*")
  args = parser.parse_args(["--out", "my_file_name.csv", "a_b.png", "--", "--c_d"])
  assert args.out == "my_file_name.csv" and args.paths == ["a_b.png", "--c_d"]


@pytest.mark.parametrize("hidden,prog,argv", [
    ("optax", "lpips-jax train", ["--workdir", "{tmp}/run"]),
    ("orbax.checkpoint", "lpips-jax train", ["--workdir", "{tmp}/run"]),
    ("skimage", "lpips-jax synthetic", ["{tmp}/run"]),
    ("matplotlib", "lpips-jax", [REF, P0, "--spatial", "{tmp}/run/map.png"]),
])
def test_a_missing_extra_is_one_line_before_any_work(hidden, prog, argv, monkeypatch, tmp_path, capsys):
  from lpips_jax import command

  monkeypatch.setitem(sys.modules, hidden, None)  # as if not installed: importing it raises ImportError
  for module, name in (("lpips_jax.command", "load"), ("lpips_jax.train.train", "train_and_evaluate")):
    monkeypatch.setattr(importlib.import_module(module), name, raising(AssertionError("work started")))
  job = prog.split()[1:]
  assert command.main(job + [a.replace("{tmp}", str(tmp_path)) for a in argv]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and f"needs {hidden}" in err, err
  assert ('pip install "jax-lpips[train]"' if hidden != "matplotlib" else 'pip install "matplotlib"') in err
  assert not (tmp_path / "run").exists()  # nothing was written
