"""Benchmarks: each method's fast path against a faithful naive baseline, timed in one run."""
