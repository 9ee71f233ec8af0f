"""Scale-out across hosts, and a network partition: one worker runs on its own test host (a
network namespace joined to this one by a veth pair), reaches PostgreSQL and Redis over that
link and takes chunks like any worker. The link is cut while it holds a chunk; a worker on
this host takes the chunk over once the lease expires; the link is healed. The cut-off
worker's late writes are refused by the lease's fencing token, and every document has exactly
one result.

Needs ``ip netns`` (root, CAP_NET_ADMIN, CAP_SYS_ADMIN): skipped with the reason where the
container does not permit it.
"""

from __future__ import annotations

import functools
import random
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.faults.conftest import Deployment, Worker, deployment, wait_for

pytestmark = pytest.mark.e2e

SUB_BATCH = "4"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


@dataclass
class NetHost:
    """A network namespace at ``ns_ip``; this host is ``host_ip`` across the veth pair."""

    ns: str
    host_veth: str
    host_ip: str
    ns_ip: str
    net: str

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def cut(self) -> None:
        _ip("link", "set", self.host_veth, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_veth, "up")


@pytest.fixture(scope="module")
def test_host() -> Iterator[NetHost]:
    """Made here, removed afterwards (also on failure); a skip says why it cannot be made."""
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed: no test host can be made")
    tag = secrets.token_hex(3)
    ns, host_veth, ns_veth = f"dq{tag}", f"dqh{tag}", f"dqn{tag}"
    used = _ip("-4", "addr", "show").stdout
    third = random.choice([n for n in range(256) if f"10.231.{n}." not in used])
    net, host_ip, ns_ip = f"10.231.{third}.0/30", f"10.231.{third}.1", f"10.231.{third}.2"
    probe = _ip("netns", "add", ns, check=False)
    if probe.returncode != 0:
        pytest.skip(f"`ip netns add` is not permitted here ({probe.stderr.strip()})")
    try:
        veth = _ip("link", "add", host_veth, "type", "veth", "peer", "name", ns_veth, check=False)
        if veth.returncode != 0:
            pytest.skip(f"cannot make a veth pair here ({veth.stderr.strip()})")
        _ip("link", "set", ns_veth, "netns", ns)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_veth)
        _ip("link", "set", host_veth, "up")
        _ip("-n", ns, "addr", "add", f"{ns_ip}/30", "dev", ns_veth)
        _ip("-n", ns, "link", "set", ns_veth, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield NetHost(ns, host_veth, host_ip, ns_ip, net)
    finally:
        _ip("link", "del", host_veth, check=False)  # takes its peer with it
        _ip("netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def dep(test_host: NetHost, logs_dir: Path) -> Iterator[Deployment]:
    with deployment(
        logs_dir, listen=("127.0.0.1", test_host.host_ip), trust_nets=(test_host.net,)
    ) as d:
        d.mark("deployment ready")
        yield d


def refused_lines(worker: Worker, chunk_id: uuid.UUID) -> list[str]:
    """The worker's log lines saying its late work on the chunk did not land: a write under
    its old lease was refused (the fence), its heartbeat's renewal under that lease was refused
    first (the runner then stops before writing), or the transaction it had open when the link
    went down was ended under it (the server's idle-in-transaction timeout, or the worker's own
    TCP timeout), so nothing of it committed and the runner gave the chunk up."""
    return [
        line
        for line in worker.log.read_text().splitlines()
        if (f"chunk {chunk_id}: lease lost" in line and "refused" in line)
        or f"chunk {chunk_id}: the heartbeat lost its lease" in line
        or (f"chunk {chunk_id}: transient failure" in line and "database unavailable" in line)
    ]


def test_cut_off_worker_is_taken_over_and_its_late_writes_refused(
    dep: Deployment, test_host: NetHost
) -> None:
    remote = dep.start_worker(
        "dq-remote",
        prefix=test_host.prefix,
        db_host=test_host.host_ip,
        DOCQUEUE_SUB_BATCH_SIZE=SUB_BATCH,
    )
    local = dep.start_worker("dq-local", DOCQUEUE_SUB_BATCH_SIZE=SUB_BATCH)
    dep.wait_ready(remote)
    dep.wait_ready(local)
    # The remote worker really is on the other side of the link.
    (addrs,) = dep.sql(
        "SELECT array_agg(DISTINCT host(client_addr)) FROM pg_stat_activity "
        "WHERE datname = 'docqueue'"
    )[0]
    assert test_host.ns_ip in addrs, addrs
    dep.mark("workers ready")

    n = 3000
    job_id = dep.submit(n, 40, "net")
    # Cut while the remote worker holds a chunk and is in the middle of a transaction that
    # locked its job (the worst moment: its session keeps that lock while the link is down).
    held: list[tuple[uuid.UUID, uuid.UUID]] = []
    deadline = time.monotonic() + 90
    while not held:
        assert time.monotonic() < deadline, "the remote worker never held a chunk as wanted"
        if not dep.leased_by(remote):
            time.sleep(0.05)
            continue
        test_host.cut()
        time.sleep(0.5)  # whatever was in flight lands or is lost
        held = dep.leased_by(remote)
        if not (held and dep.locking_a_job(client_addr=test_host.ns_ip)):
            held = []
            test_host.heal()
            time.sleep(0.5)
    dep.mark(f"link cut mid-transaction; the remote worker holds {len(held)} chunks")

    try:
        for chunk_id, token in held:
            new_owner = wait_for(
                f"chunk {chunk_id} to be taken over",
                functools.partial(dep.taken_over, chunk_id, token, remote),
                45,
            )
            assert new_owner == local.name
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{dep.diagnose(job_id)}") from None
    finally:
        test_host.heal()
    dep.mark("taken over; link healed")

    # Once the link is back, the remote worker carries on with the lease it had: every write,
    # release or close under it is refused, since the chunk has a new token.
    for chunk_id, _ in held:
        wait_for(
            f"the remote worker's late write on chunk {chunk_id} to be refused",
            functools.partial(refused_lines, remote, chunk_id),
            90,
            every_s=0.5,
        )
    dep.mark("late writes refused")

    dep.wait_finished(job_id, 120)
    dep.assert_each_document_once(job_id, n)
    # The remote worker comes back after the partition like any other worker.
    wait_for(
        "the remote worker to heartbeat again after the link healed",
        lambda: dep.sql(
            "SELECT 1 FROM workers WHERE name = %s AND last_heartbeat_at > now() - interval '5 s'",
            remote.name,
        ),
        60,
    )
    dep.mark("job finished, each document once")
