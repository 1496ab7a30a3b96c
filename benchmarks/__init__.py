"""Benchmarks and studies of fdpo."""
