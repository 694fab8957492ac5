"""Benchmark scripts (run as ``python benchmarks/<script>.py``) and their shared helpers in :mod:`benchmarks.lib`."""
