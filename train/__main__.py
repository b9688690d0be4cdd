import sys

from lpips_jax.train.main import main

sys.exit(main())
