"""A stand-in for ``nvidia-smi``: GPUs cannot be had here, so the launcher's discovery is fed a
script that lists some (the only mock in the suite, of what cannot run on this machine)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def fake_nvidia_smi(tmp_path: Path, gpus: int) -> str:
    """A stand-in for nvidia-smi that lists ``gpus`` devices; returns a PATH using it."""
    script = tmp_path / "nvidia-smi"
    lines = "\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:04d})" for i in range(gpus))
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{lines}\nEOF\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
