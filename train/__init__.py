"""Training and evaluating LPIPS on BAPPS 2AFC judgments: `python -m train`, `python -m train.eval`."""
