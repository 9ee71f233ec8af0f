"""GPU pinning plans, with a fake `nvidia-smi` on PATH (no GPU on CI hosts), and each
process's metrics port."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.gpus import fake_nvidia_smi
from workers import launcher


def test_all_gpus_one_worker_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, 4))
    specs = launcher.plan("all")
    assert [(s.hostname, s.devices) for s in specs] == [
        ("gpu0@%h", "0"),
        ("gpu1@%h", "1"),
        ("gpu2@%h", "2"),
        ("gpu3@%h", "3"),
    ]
    env = launcher.child_env(specs[2], "m", 1)
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["DOCQUEUE_WORKER_MODEL"] == "m"


def test_tensor_parallel_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, 4))
    specs = launcher.plan("all", tensor_parallel=2)
    assert [(s.hostname, s.devices) for s in specs] == [("gpu0-1@%h", "0,1"), ("gpu2-3@%h", "2,3")]
    assert [(s.hostname, s.devices) for s in launcher.plan("0,1", 2)] == [("gpu0-1@%h", "0,1")]
    with pytest.raises(ValueError, match="does not divide"):
        launcher.plan("0,1,2", 2)


def test_explicit_list_and_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert [(s.hostname, s.devices) for s in launcher.plan("1,3")] == [
        ("gpu1@%h", "1"),
        ("gpu3@%h", "3"),
    ]
    cpu = (f"cpu-{os.getpid()}@%h", None)  # unique per launcher: two on one host stay apart
    assert [(s.hostname, s.devices) for s in launcher.plan("none")] == [cpu]
    # No nvidia-smi at all: `all` means one CPU worker.
    monkeypatch.setenv("PATH", str(tmp_path))
    assert [(s.hostname, s.devices) for s in launcher.plan("all")] == [cpu]
    with pytest.raises(ValueError, match="not a GPU index"):
        launcher.plan("0,x")


def test_worker_command_uses_safe_celery_options() -> None:
    cmd = launcher.command(launcher.WorkerSpec("gpu0@%h", "0"), "org/model", 3, "info")
    joined = " ".join(cmd)
    assert "-A workers.tasks worker" in joined
    assert "--pool threads --concurrency 3" in joined
    assert "--prefetch-multiplier 1" in joined and "--task-events" in joined
    assert "--hostname gpu0@%h" in joined
    from service.contract import queue_for_model

    assert f"--queues {queue_for_model('org/model')}" in joined


def test_each_gpu_process_gets_its_own_metrics_port() -> None:
    specs = [launcher.WorkerSpec(f"gpu{i}@%h", str(i)) for i in range(3)]
    assert launcher.with_metrics_ports(specs, None) == specs
    ported = launcher.with_metrics_ports(specs, 9100)
    ports = [launcher.child_env(s, "m", 1)["DOCQUEUE_WORKER_METRICS_PORT"] for s in ported]
    assert ports == ["9100", "9101", "9102"]
