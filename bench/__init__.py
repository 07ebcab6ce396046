"""Benchmarks, each a script run from the repository root: `python bench/bench_<name>.py --help`.
Each prints its figures and ends with one JSON line."""
