"""Benchmark scripts (not tests): ``make bench``, ``make bench-aggregate``. See docs/performance.md."""
