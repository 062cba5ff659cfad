"""Benchmarks: `python -m cprec.bench.<name>`; each prints a table and saves JSON under bench_results/."""
