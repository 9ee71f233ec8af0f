"""Private PostgreSQL and Redis servers for tests that crash, flush or restart them.

The shared servers (tests/conftest.py) are never touched: each private server has its own data
directory (PostgreSQL, made by ``initdb``) or none at all (Redis, no persistence), its own free
port, and is stopped (its whole process group killed) when the test is done, even on failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import psycopg
import redis as redis_lib

from tests.support.stack import free_port


def _pg_bindir() -> Path:
    """The newest PostgreSQL's binaries (Debian layout), or the ones on PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError(
            "no PostgreSQL binaries (initdb) under /usr/lib/postgresql/*/bin or PATH"
        )
    return Path(initdb).parent


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the ``postgres`` OS user."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


class PrivatePostgres:
    """A throwaway PostgreSQL cluster: trust auth, listening on 127.0.0.1 and any extra
    addresses given (``trust_nets``: the networks allowed in over them), with the server's
    defaults but for ``conf`` (more postgresql.conf settings)."""

    def __init__(
        self,
        listen: Sequence[str] = ("127.0.0.1",),
        trust_nets: Sequence[str] = (),
        conf: Mapping[str, str] | None = None,
    ) -> None:
        self.bindir = _pg_bindir()
        self.port = free_port()
        self.listen = list(listen)
        self.root = Path(tempfile.mkdtemp(prefix="dq-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf_file:
            conf_file.write(
                f"port = {self.port}\n"
                f"listen_addresses = '{','.join(self.listen)}'\n"
                f"unix_socket_directories = '{self.root}'\n"
                "max_connections = 300\n"
                # A crash here is the server's process dying, never the machine: what reached
                # the OS survives it, so fsync buys nothing. Commits stay synchronous (WAL is
                # written before a commit returns), so an acknowledged commit survives too.
                "fsync = off\n"
                "shared_buffers = 32MB\n"
            )
            for key, value in (conf or {}).items():
                conf_file.write(f"{key} = '{value}'\n")
        with (self.data / "pg_hba.conf").open("a") as hba:
            for net in trust_nets:
                hba.write(f"host all all {net} trust\n")

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        done = subprocess.run(
            _as_postgres(list(cmd)), capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stdout}{done.stderr}\n{log}")

    def url(self, host: str = "127.0.0.1", database: str = "docqueue") -> str:
        return f"postgresql+psycopg://postgres@{host}:{self.port}/{database}"

    def start(self) -> None:
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
            "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``immediate``: every server process quits at once, no checkpoint (a crash)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def create_database(self, name: str = "docqueue") -> None:
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def cleanup(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self.stop("immediate")
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():  # pg_ctl could not stop it: kill the postmaster's group
            with contextlib.suppress(Exception):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def private_postgres(
    listen: Sequence[str] = ("127.0.0.1",),
    trust_nets: Sequence[str] = (),
    conf: Mapping[str, str] | None = None,
) -> Iterator[PrivatePostgres]:
    """A started private cluster with an empty ``docqueue`` database; removed afterwards."""
    pg = PrivatePostgres(listen, trust_nets, conf)
    try:
        pg.start()
        pg.create_database()
        yield pg
    finally:
        pg.cleanup()


class PrivateRedis:
    """``redis-server`` without persistence on its own port: a restart loses everything, as a
    Redis run without AOF/RDB does."""

    def __init__(self, bind: Sequence[str] = ("127.0.0.1",)) -> None:
        self.port = free_port()
        self.bind = list(bind)
        self.root = Path(tempfile.mkdtemp(prefix="dq-redis-"))
        self.log = self.root / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, host: str = "127.0.0.1", db: int = 0) -> str:
        return f"redis://{host}:{self.port}/{db}"

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.url(), socket_connect_timeout=3, socket_timeout=10)

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH")
        with self.log.open("ab") as out:
            argv = [
                exe, "--port", str(self.port), "--bind", *self.bind, "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
                "--dir", str(self.root),
            ]  # fmt: skip
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                with self.client() as c:
                    c.ping()
                return
            except redis_lib.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start:\n{self.log.read_text()}"
                    ) from None
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        """Killed (SIGKILL) and started again on the same port, empty."""
        self.kill()
        self.start()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def private_redis(bind: Sequence[str] = ("127.0.0.1",)) -> Iterator[PrivateRedis]:
    r = PrivateRedis(bind)
    try:
        r.start()
        yield r
    finally:
        r.cleanup()
