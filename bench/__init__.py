"""Benchmarks: measurements that print tables, not tests.

Each benchmark is a package `bench/<name>/` whose `run` module has
`main(argv: list[str]) -> int`; `python -m bench <name> [args]` runs one and
`python -m bench` runs them all.
"""
