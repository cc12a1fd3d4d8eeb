"""Benchmarks behind ``fogline bench NAME``: each prints a ratio against a baseline measured in the same run."""
