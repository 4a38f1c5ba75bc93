"""Benchmarks and studies, run as modules from the repository root (``python -m bench.<name>``);
results in bench/results/. No test imports them (tests/test_packaging.py checks)."""
