"""Operational scripts: installation, model preparation, benchmarks."""
