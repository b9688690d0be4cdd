"""The `lpips-jax` command's entry point, also `python -m lpips_jax ...` (where no console script is on the PATH)."""
import importlib
import sys

from lpips_jax import runner


def main(argv=None) -> int:
  """The command's exit status; importing it (JAX's start-up takes seconds) is inside the runner too, so a Ctrl-C
  then is one line as well."""
  return runner.run("lpips-jax", lambda args: importlib.import_module("lpips_jax.command").main(args), argv)


def console() -> None:
  """The console script: `main`, then `runner.exit`."""
  runner.exit(main())


if __name__ == "__main__":
  runner.exit(main(sys.argv[1:]))
