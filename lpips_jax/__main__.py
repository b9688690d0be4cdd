"""`python -m lpips_jax ...` is the `lpips-jax` command (also where no console script is on the PATH)."""
import sys

from lpips_jax.cli import main

sys.exit(main())
