"""Training and evaluating LPIPS on BAPPS 2AFC judgments: `lpips-jax train`, `lpips-jax eval`."""
