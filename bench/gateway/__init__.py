"""Benchmark of the gateway: `python -m bench gateway` (see run.py)."""
