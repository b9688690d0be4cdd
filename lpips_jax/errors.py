"""The one error type for bad input: what a caller passed, or a file it named, cannot be used.

Every check of the library (`lpips_jax.checks`, weight files, image files, BAPPS folders, training settings)
raises an `InputError` whose message names the problem and the fix. It is a `ValueError`, so callers that catch
that keep working; the commands (`lpips_jax.runner`) print it as one line, while any other exception is a bug and
keeps its traceback.
"""


class InputError(ValueError):
  """Bad input: the message names the argument or file, the problem and the fix."""
