"""A whole docqueue deployment on private servers, for tests that break it on purpose.

PostgreSQL and Redis are private (tests/support/servers.py): these tests crash, flush and
restart them, and never touch the shared ones. ``docqueue api`` and ``docqueue worker``
processes are real; workers run the zero-cost ``bench`` engine, so no model has to start, and
each worker gets its own UTS namespace (its own host name), as on separate machines: Celery
names it ``cpu-<launcher pid>@<host>``, which is what ``chunks.worker`` records.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import pytest

from tests.support.servers import PrivatePostgres, PrivateRedis, private_postgres, private_redis
from tests.support.stack import docqueue_bin, free_port

MODEL = "bench-faults"

#: Short leases and a fast reconciler: a fault is recovered from in seconds.
FAST = {
    "DOCQUEUE_ENGINE": "bench",
    "DOCQUEUE_LEASE_S": "4",
    "DOCQUEUE_RECONCILE_INTERVAL_S": "1",
    "DOCQUEUE_REQUEUE_AFTER_S": "3",
    "DOCQUEUE_WORKER_HEARTBEAT_S": "1",
    "DOCQUEUE_RETRY_BACKOFF_S": "0.5",
    # Every fault costs the chunks in flight an attempt; these tests count rows lost or
    # doubled, not the attempt cap (tests/integration/service/store covers that).
    "DOCQUEUE_MAX_ATTEMPTS": "20",
    "DOCQUEUE_LOG_LEVEL": "INFO",
}

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, every_s: float = 0.2) -> T:
    """Polls ``check`` until it returns something truthy; database errors (a server being
    restarted) count as "not yet"."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = check()
        except (psycopg.OperationalError, httpx.TransportError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last})")
        time.sleep(every_s)


def kill_groups(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = 3) -> None:
    """Stops process groups, all at once: woken first (one may be SIGSTOPped), SIGTERM, and
    SIGKILL for whatever is left after ``grace_s``."""
    for proc in procs:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


@dataclass
class Worker:
    host: str
    proc: subprocess.Popen[bytes]  # the launcher (`docqueue worker`), its group's leader
    log: Path
    registered: str = ""  # its name in the registry, once ``wait_ready`` saw it

    @property
    def name(self) -> str:
        assert self.registered, f"worker on {self.host}: wait_ready first"
        return self.registered


@dataclass
class Deployment:
    pg: PrivatePostgres
    redis: PrivateRedis
    root: Path
    api: str = ""
    key: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def env(self, host: str = "127.0.0.1", **extra: str) -> dict[str, str]:
        """The environment of a docqueue process that reaches the servers at ``host``."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("DOCQUEUE_")}
        return {
            **base,
            "DOCQUEUE_DATABASE_URL": self.pg.url(host),
            "DOCQUEUE_REDIS_URL": self.redis.url(host),
            **FAST,
            **extra,
        }

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(
            self.pg.url().replace("postgresql+psycopg://", "postgresql://", 1),
            autocommit=True,
            connect_timeout=5,
        ) as conn:
            return conn.execute(query, args).fetchall()

    def spawn(self, argv: Sequence[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def start_worker(
        self, host: str, prefix: Sequence[str] = (), db_host: str = "127.0.0.1", **env: str
    ) -> Worker:
        """`docqueue worker` on its own host name (``unshare --uts``), after ``prefix`` (e.g.
        ``ip netns exec NS``), reaching the servers at ``db_host``. See ``wait_ready``."""
        log = self.root / f"worker-{host}.log"
        argv = [
            *prefix, "unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$0" "$@"',
            docqueue_bin(), "worker", "--model", MODEL, "--gpus", "none",
        ]  # fmt: skip
        return Worker(host, self.spawn(argv, log, self.env(db_host, **env)), log)

    def wait_ready(self, worker: Worker, timeout_s: float = 90) -> None:
        """Until the worker has registered and renewed its heartbeat."""
        log = worker.log

        def ready() -> bool:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"worker {worker.host} exited:\n{log.read_text()[-5000:]}")
            rows = self.sql(  # `cpu-<launcher pid>@<host>`: one launcher per host name here
                "SELECT name FROM workers WHERE name LIKE %s AND engine_ready "
                "AND last_heartbeat_at > now() - interval '5 seconds'",
                f"cpu-%@{worker.host}",
            )
            if rows:
                worker.registered = str(rows[0][0])
            return bool(rows)

        wait_for(f"worker on {worker.host} to register", ready, timeout_s)

    def mark(self, what: str) -> None:
        """A line in phases.log (and the test's output): when each step of a test happened."""
        line = f"{time.monotonic() - self.t0:7.1f} s  {what}"
        print(line, flush=True)
        with (self.root / "phases.log").open("a") as f:
            f.write(line + "\n")

    def celery_pid(self, worker: Worker) -> int:
        """The pid of the worker's Celery process (the launcher's child), as it registered."""
        rows = self.sql("SELECT pid FROM workers WHERE name = %s", worker.name)
        assert rows, f"{worker.name} is not registered"
        return int(rows[0][0])

    def leased_by(self, worker: Worker) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """(chunk id, lease token) of the chunks ``worker`` holds now."""
        rows = self.sql(
            "SELECT id, lease_token FROM chunks WHERE state = 'leased' AND worker = %s",
            worker.name,
        )
        return [(r[0], r[1]) for r in rows]

    def taken_over(
        self,
        chunk_id: uuid.UUID,
        token: uuid.UUID,
        lost_by: Worker,
        not_before: datetime | None = None,
    ) -> str | None:
        """The worker that took the chunk over from ``lost_by`` (None: nobody yet). The
        chunk's ``worker`` changes when another worker claims it, with a new token. Seen taken
        over while Postgres's clock is still before ``not_before`` (the lost lease's expiry)
        fails: a live lease was stolen."""
        rows = self.sql(
            "SELECT worker, now() < %s FROM chunks WHERE id = %s AND worker <> %s "
            "AND lease_token IS DISTINCT FROM %s",
            not_before,
            chunk_id,
            lost_by.name,
            token,
        )
        if rows and rows[0][1]:
            raise AssertionError(f"chunk {chunk_id} taken over before its lease ran out")
        return str(rows[0][0]) if rows else None

    def lease_expiry(self, chunk_id: uuid.UUID) -> datetime:
        """When the chunk's current lease runs out, by Postgres's clock."""
        ((expires,),) = self.sql("SELECT lease_expires_at FROM chunks WHERE id = %s", chunk_id)
        assert isinstance(expires, datetime)
        return expires

    def locking_a_job(
        self, client_ports: Sequence[int] = (), client_addr: str | None = None
    ) -> bool:
        """Whether a session (by its client's ports, or address) is idle in a transaction that
        locked a job row: frozen mid-transaction, it keeps every other worker off that job."""
        rows = self.sql(
            "SELECT 1 FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
            "WHERE l.relation = 'jobs'::regclass AND l.granted "
            "AND a.state LIKE 'idle in transaction%%' "
            "AND (a.client_port = ANY(%s) OR host(a.client_addr) = %s)",
            list(client_ports),
            client_addr,
        )
        return bool(rows)

    def submit(self, n: int, chunk_size: int, tag: str) -> str:
        body = "id,text\n" + "".join(f"{tag}{i},fault document {i}\n" for i in range(n))
        resp = httpx.post(
            f"{self.api}/v1/jobs",
            headers={"Authorization": f"Bearer {self.key}"},
            data={"task": "generate", "model": MODEL, "id_column": "id", "max_tokens": "8",
                  "chunk_size": str(chunk_size)},
            files={"file": ("docs.csv", body.encode(), "text/csv")},
            timeout=60,
        )  # fmt: skip
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    def job(self, job_id: str) -> tuple[Any, ...]:
        rows = self.sql(
            "SELECT status, total, succeeded, failed, cancelled FROM jobs WHERE id = %s",
            uuid.UUID(job_id),
        )
        return rows[0]

    def wait_finished(self, job_id: str, timeout_s: float) -> tuple[Any, ...]:
        def finished() -> tuple[Any, ...] | None:
            job = self.job(job_id)
            return job if job[0] in ("completed", "failed", "cancelled") else None

        try:
            return wait_for(f"job {job_id} to finish", finished, timeout_s, every_s=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnose(job_id)}") from None

    def diagnose(self, job_id: str) -> str:
        """What is open in the job, and who holds what: for a failure's message."""
        try:
            chunks = self.sql(
                "SELECT seq, state, worker, attempts, lease_expires_at - now(), error "
                "FROM chunks WHERE job_id = %s AND state IN ('queued', 'leased') ORDER BY seq",
                uuid.UUID(job_id),
            )
            sessions = self.sql(
                "SELECT pid, client_addr, state, wait_event_type, now() - xact_start, "
                "left(query, 120) FROM pg_stat_activity WHERE datname = 'docqueue' "
                "AND state <> 'idle' AND pid <> pg_backend_pid()"
            )
        except psycopg.Error as exc:
            return f"(could not read the database: {exc})"
        return f"open chunks: {chunks}\nbusy sessions: {sessions}"

    def assert_each_document_once(self, job_id: str, n: int) -> None:
        """Every document has exactly one result, and it is a success; the job says so too."""
        jid = uuid.UUID(job_id)
        (per_doc,) = self.sql(
            """
            SELECT count(*) FILTER (WHERE ok = 1), count(*) FILTER (WHERE ok = 0),
                   count(*) FILTER (WHERE ok > 1), coalesce(sum(n), 0)
            FROM (SELECT d.idx, count(r.idx) AS n, count(r.idx) FILTER (WHERE r.error IS NULL) AS ok
                  FROM documents d LEFT JOIN results r ON r.job_id = d.job_id AND r.idx = d.idx
                  WHERE d.job_id = %s GROUP BY d.idx) t
            """,
            jid,
        )
        one, none, many, results = per_doc
        (total_results,) = self.sql("SELECT count(*) FROM results WHERE job_id = %s", jid)[0]
        errors = self.sql(
            "SELECT idx, error FROM results WHERE job_id = %s AND error IS NOT NULL LIMIT 5", jid
        )
        assert (one, none, many) == (n, 0, 0), (
            f"documents with one success {one}, none {none}, several {many} (of {n}); "
            f"errors: {errors}"
        )
        assert results == total_results == n
        status, total, succeeded, failed, cancelled = self.job(job_id)
        assert (status, total, succeeded, failed, cancelled) == ("completed", n, n, 0, 0)
        open_chunks = self.sql(
            "SELECT count(*) FROM chunks WHERE job_id = %s AND state <> 'done'", jid
        )[0][0]
        assert open_chunks == 0


def client_ports(pid: int) -> list[int]:
    """The local TCP ports of a process's sockets (/proc): which database sessions are its."""
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports: list[int] = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@contextmanager
def deployment(
    root: Path,
    listen: Sequence[str] = ("127.0.0.1",),
    trust_nets: Sequence[str] = (),
    pg_conf: Mapping[str, str] | None = None,
) -> Iterator[Deployment]:
    """Private PostgreSQL (migrated) and Redis, `docqueue api`, and an API key. Workers are
    started by the test; every process is killed afterwards, also on failure."""
    from service.store.engine import get_engine, session_scope
    from service.store.keys import create_key
    from service.store.migrate import upgrade

    # Each worker needs a host name of its own (a UTS namespace), as on separate machines:
    # the tests tell workers apart by host, and chunks.worker names it.
    probe = subprocess.run(["unshare", "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"`unshare --uts` is not permitted here ({probe.stderr.strip()})")

    with private_postgres(listen, trust_nets, pg_conf) as pg, private_redis(listen) as redis:
        dep = Deployment(pg, redis, root)
        try:
            upgrade(pg.url())  # the schema is set up, not tested, here: in-process is cheaper
            with session_scope(pg.url()) as session:
                dep.key = create_key(session, "faults")
            get_engine(pg.url()).dispose()  # no pooled connection outlives the server
            port = free_port()
            api = dep.spawn(
                [docqueue_bin(), "api", "--host", "127.0.0.1", "--port", str(port)],
                root / "api.log",
                dep.env(),
            )
            dep.api = f"http://127.0.0.1:{port}"

            def healthy() -> bool:
                if api.poll() is not None:
                    raise RuntimeError(f"api exited:\n{(root / 'api.log').read_text()}")
                return httpx.get(f"{dep.api}/healthz", timeout=2).status_code == 200

            wait_for("docqueue api", healthy, 60)
            yield dep
        finally:
            kill_groups(dep.procs)


@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")
