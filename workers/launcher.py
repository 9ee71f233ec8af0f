"""`docqueue worker`: one Celery worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES.

The launcher only plans, starts and supervises: each child is a plain Celery worker
(``celery -A workers.tasks worker``) that builds its engine once at start. A child that dies is
restarted after a pause; SIGTERM/SIGINT are passed on for a warm shutdown.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace

from service.contract import queues_for_model

log = logging.getLogger("docqueue.worker")


@dataclass(frozen=True)
class WorkerSpec:
    hostname: str  # Celery node name; %h expands to the host name
    devices: str | None  # CUDA_VISIBLE_DEVICES for the child; None on a CPU host
    env: dict[str, str] = field(default_factory=dict)


def visible_gpus() -> list[str]:
    """GPU indices that ``nvidia-smi -L`` lists; none on a host without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20, check=True)
    except (subprocess.SubprocessError, OSError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def plan(gpus: str, tensor_parallel: int = 1) -> list[WorkerSpec]:
    """``all`` (every visible GPU), ``none``/``cpu``, or a list like ``0,1``.

    With ``tensor_parallel`` N, each worker spans N consecutive GPUs of the list.
    """
    spec = gpus.strip().lower()
    if spec in ("none", "cpu", ""):
        devices: list[str] = []
    elif spec == "all":
        devices = visible_gpus()
    else:
        devices = [d.strip() for d in spec.split(",") if d.strip()]
        bad = [d for d in devices if not d.isdigit()]
        if bad:
            raise ValueError(f"--gpus: {bad[0]!r} is not a GPU index (use all, none or 0,1,...)")
    if not devices:
        # The launcher's pid keeps two CPU workers on one host apart (one per model, say): the
        # registry, the dispatcher's slots and Flower all know a worker by this name.
        return [WorkerSpec(hostname=f"cpu-{os.getpid()}@%h", devices=None)]
    if tensor_parallel < 1 or len(devices) % tensor_parallel:
        raise ValueError(
            f"--tensor-parallel {tensor_parallel} does not divide the {len(devices)} GPUs given"
        )
    specs = []
    for k in range(0, len(devices), tensor_parallel):
        group = devices[k : k + tensor_parallel]
        name = "gpu" + "-".join(group)
        specs.append(WorkerSpec(hostname=f"{name}@%h", devices=",".join(group)))
    return specs


def with_metrics_ports(specs: list[WorkerSpec], base_port: int | None) -> list[WorkerSpec]:
    """The i-th worker process serves Prometheus metrics on ``base_port + i``: one registry per
    process, so no figure is shared or double counted (see workers.metrics)."""
    if base_port is None:
        return specs
    return [
        replace(spec, env={**spec.env, "DOCQUEUE_WORKER_METRICS_PORT": str(base_port + i)})
        for i, spec in enumerate(specs)
    ]


def command(spec: WorkerSpec, model: str, concurrency: int, loglevel: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "workers.tasks", "worker",
        "--pool", "threads", "--concurrency", str(concurrency),
        # Interactive first, then bulk: the broker polls them in this order (service.contract).
        "--queues", ",".join(queues_for_model(model)),
        "--hostname", spec.hostname,
        "--prefetch-multiplier", "1",
        "--task-events",
        "--without-gossip", "--without-mingle",
        "--loglevel", loglevel,
    ]  # fmt: skip


def child_env(spec: WorkerSpec, model: str, tensor_parallel: int) -> dict[str, str]:
    env = dict(os.environ)
    env["DOCQUEUE_WORKER_MODEL"] = model
    env["DOCQUEUE_TENSOR_PARALLEL_SIZE"] = str(tensor_parallel)
    if spec.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec.devices
    env.update(spec.env)
    return env


def supervise(
    specs: list[WorkerSpec],
    model: str,
    concurrency: int,
    tensor_parallel: int,
    loglevel: str,
    restart_delay_s: float = 5.0,
    stop_timeout_s: float = 300.0,
) -> int:
    """Starts every worker and keeps them running until SIGTERM/SIGINT.

    Children get the signal for a warm shutdown (running chunks finish); any still alive after
    ``stop_timeout_s`` are killed, and their chunks are re-run elsewhere when leases expire.
    """
    stopping = False
    stop_deadline = 0.0
    procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(i: int) -> None:
        spec = specs[i]
        procs[i] = subprocess.Popen(
            command(spec, model, concurrency, loglevel), env=child_env(spec, model, tensor_parallel)
        )
        log.info(
            "started %s (pid %d, CUDA_VISIBLE_DEVICES=%s)",
            spec.hostname,
            procs[i].pid,
            spec.devices,
        )

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping, stop_deadline
        if not stopping:
            stop_deadline = time.monotonic() + stop_timeout_s
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(len(specs)):
        start(i)
    died_at: dict[int, float] = {}
    while True:
        time.sleep(0.5)
        if stopping:
            alive = [p for p in procs.values() if p.poll() is None]
            if not alive:
                return 0
            if time.monotonic() > stop_deadline:
                for p in alive:
                    log.warning("pid %d did not stop in %.0f s; killing it", p.pid, stop_timeout_s)
                    p.kill()
            continue
        for i, p in list(procs.items()):
            code = p.poll()
            if code is None:
                continue
            if i not in died_at:
                log.warning(
                    "%s exited with %s; restarting in %.0f s",
                    specs[i].hostname,
                    code,
                    restart_delay_s,
                )
                died_at[i] = time.monotonic()
            elif time.monotonic() - died_at[i] >= restart_delay_s:
                del died_at[i]
                start(i)
