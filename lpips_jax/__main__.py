"""The `lpips-jax` command's entry point, also `python -m lpips_jax ...` (where no console script is on the PATH)."""
import sys


def main() -> int:
  try:  # importing JAX takes seconds: a Ctrl-C then is one line too, not a traceback from inside an import
    from lpips_jax.cli import main as command
  except KeyboardInterrupt:
    print("lpips-jax: interrupted", file=sys.stderr)
    return 130
  return command()


if __name__ == "__main__":
  sys.exit(main())
