"""Faults, one after another, under running jobs: a worker killed with SIGKILL mid-chunk, Redis
flushed and restarted empty (a job submitted while it is down), PostgreSQL crashed and restarted
(immediate mode) mid-chunk, a worker paused past its lease in the middle of a transaction. Each
job still ends with every document having exactly one successful result, and the job's counts
say the same.

Real processes only: private PostgreSQL and Redis, `docqueue api`, three `docqueue worker`
processes on their own host names, running the zero-cost bench engine.
"""

from __future__ import annotations

import functools
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.faults.conftest import Deployment, Worker, client_ports, deployment, wait_for

pytestmark = pytest.mark.e2e

#: Results are written every few rows, so a chunk is mid-way for a while and a fault lands
#: between two of its writes.
SUB_BATCH = "4"
ROWS, CHUNK = 3000, 40


@pytest.fixture(scope="module")
def dep(logs_dir: Path) -> Iterator[Deployment]:
    with deployment(logs_dir) as d:
        d.mark("deployment ready")
        yield d


def stop_holding(
    dep: Deployment, worker: Worker, also: Callable[[int], bool] = lambda pid: True
) -> tuple[int, list[tuple[uuid.UUID, uuid.UUID]]]:
    """SIGSTOPs the worker's Celery process at a moment it holds at least one chunk (and
    ``also(pid)`` holds); returns its pid and those chunks, frozen with it."""
    deadline = time.monotonic() + 60
    while True:
        pid = dep.celery_pid(worker)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.3)  # what it had sent lands; what it had not, waits
        held = dep.leased_by(worker)
        if held and also(pid):
            return pid, held
        os.kill(pid, signal.SIGCONT)
        assert time.monotonic() < deadline, f"{worker.name} never held a chunk as wanted"
        time.sleep(0.05)


def succeeded(dep: Deployment, job_id: str) -> int:
    return int(dep.job(job_id)[2])


def test_every_document_once_through_kill_flush_crash_and_pause(dep: Deployment) -> None:
    a, b, c = (dep.start_worker(f"fault-{x}", DOCQUEUE_SUB_BATCH_SIZE=SUB_BATCH) for x in "abc")
    for w in (a, b, c):
        dep.wait_ready(w)
    dep.mark("workers ready")
    jobs: list[str] = []

    # 1. SIGKILL a worker's Celery process while it holds chunks (stopped first, so that the
    # chunks it holds are known when it dies). Its launcher starts a new one, later.
    jobs.append(dep.submit(ROWS, CHUNK, "one"))
    wait_for("job 1 to start", lambda: succeeded(dep, jobs[0]) >= 200, 60)
    killed_pid, killed_held = stop_holding(dep, a)
    os.kill(killed_pid, signal.SIGKILL)
    dep.mark(f"killed worker a (pid {killed_pid}) holding {len(killed_held)} chunks")

    # 2. Redis loses everything: job 1's queued messages are flushed, then Redis is down while
    # job 2 is submitted (the API accepts it; its messages are not sent), then back, empty.
    dep.redis.client().flushall()
    dep.redis.kill()
    jobs.append(dep.submit(ROWS, CHUNK, "two"))
    dep.redis.start()
    dep.mark("Redis flushed, killed, job 2 submitted, Redis started")
    wait_for("job 2 to start after Redis came back", lambda: succeeded(dep, jobs[1]) >= 200, 60)

    # 3. PostgreSQL crashes (immediate stop: no checkpoint, every connection cut) and comes back
    # while chunks are leased.
    wait_for("a leased chunk", lambda: dep.sql("SELECT 1 FROM chunks WHERE state = 'leased'"), 30)
    dep.pg.restart("immediate")
    dep.mark("PostgreSQL restarted (immediate)")

    # 4. A worker pauses (a VM freeze, a stop-the-world pause) past its lease, in the middle of
    # a transaction that locked its job, while it holds chunks. Another worker takes them over
    # once the lease expires; then the paused one wakes up and carries on where it was.
    jobs.append(dep.submit(ROWS, CHUNK, "three"))
    wait_for("job 3 to start", lambda: succeeded(dep, jobs[2]) >= 100, 60)
    paused_pid, paused_held = stop_holding(
        dep, b, also=lambda pid: dep.locking_a_job(client_ports(pid))
    )
    dep.mark(f"paused worker b mid-transaction, holding {len(paused_held)} chunks")
    # Taken over only once the lease ran out, by Postgres's clock (the paused worker may have
    # renewed late or early before it froze: only the database knows when).
    expiries = [dep.lease_expiry(chunk_id) for chunk_id, _ in paused_held]
    try:
        for (chunk_id, token), expires in zip(paused_held, expiries, strict=True):
            wait_for(
                f"chunk {chunk_id} of the paused worker to be taken over",
                functools.partial(dep.taken_over, chunk_id, token, b, expires),
                40,
                every_s=0.1,
            )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{dep.diagnose(jobs[2])}") from None
    finally:
        os.kill(paused_pid, signal.SIGCONT)
        dep.mark("worker b resumed")

    for n, job_id in enumerate(jobs, 1):
        try:
            dep.wait_finished(job_id, 120)
            dep.assert_each_document_once(job_id, ROWS)
        except AssertionError as exc:
            raise AssertionError(f"job {n}: {exc}") from None
    dep.mark("every job finished, each document once")

    # The faults really hit work in flight: the killed worker's chunks were run again, and
    # the paused one, once awake, was told its leases were gone.
    attempts = dep.sql(
        "SELECT max(attempts) FROM chunks WHERE id = ANY(%s)", [c for c, _ in killed_held]
    )[0][0]
    assert attempts >= 2
    b_log = b.log.read_text()
    for chunk_id, _ in paused_held:
        # Told its lease was gone (a refused write, or the heartbeat), or its open transaction
        # was ended by the server while it slept (idle_in_transaction_session_timeout): either
        # way nothing it did after waking committed (each document once, above).
        assert any(
            str(chunk_id) in line
            and (("lease" in line and "lost" in line) or "database unavailable" in line)
            for line in b_log.splitlines()
        ), f"worker b never noticed it lost chunk {chunk_id}:\n{b_log[-3000:]}"
