"""Benchmarks: ``python -m benchmarks NAME... [--quick]``; each prints one JSON line per case."""
