"""Benchmark of the node agent: CPU and memory of `mesh agent` against a real API server."""
