"""Benchmarks that write JSON: step, cache, quality."""
