"""Benchmarks (outside the test suite): `python -m bench --help`, results in docs/performance.md."""
