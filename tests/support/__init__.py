"""Helpers shared by the tests (no test imports another test module or a conftest)."""

from pathlib import Path

#: The repository root.
ROOT = Path(__file__).resolve().parents[2]
