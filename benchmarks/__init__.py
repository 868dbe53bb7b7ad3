"""Benchmarks against the reference and the machine's bounds: `python -m benchmarks run [--quick]`."""
