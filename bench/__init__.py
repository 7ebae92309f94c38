"""Benchmarks. Each one measures a baseline in the same run and prints ratios against it."""
