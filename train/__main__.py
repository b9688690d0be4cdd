"""`python -m lpips_jax.train`: `lpips-jax train`."""
from lpips_jax import runner
from lpips_jax.train.main import main

runner.exit(main())
