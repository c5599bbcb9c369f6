"""Benchmarks: real processes on real services; each prints a table and, last, one JSON line.

python -m bench.throughput --help
"""
