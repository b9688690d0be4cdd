"""Converters from the official PyTorch LPIPS weights to lpips_jax's files (`python -m convert --help`)."""
