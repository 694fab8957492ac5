"""Helpers shared by the benchmark scripts: settings and runs, data, splits, suites, results, statistics, tables."""
