"""Benchmarks (see BENCHMARKS.md); the shared harness is ``ingest``."""
