"""Result downloads against a real `docqueue api` process, attacked by readers that stall.

A download that the client stops reading used to hold a pooled database connection (and its
snapshot) for as long as the socket stayed open: a couple of dozen stalled downloads took every
connection of the pool, and every other request of the API then waited for one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.support.helpers import pg
from tests.support.stack import docqueue_bin, free_port, post_job

MAX_EXPORTS = 2
SEND_TIMEOUT_S = 2.0
ROWS = 20_000  # ~1 KiB of output each: 20 MiB, far more than the socket buffers hold
STALLED = 24  # more downloads than the API's pool has connections (10 + 10 overflow)


@pytest.fixture(scope="module")
def bounded_api(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `docqueue api` that allows MAX_EXPORTS downloads at once, each send SEND_TIMEOUT_S."""
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    env = {
        **os.environ,
        "DOCQUEUE_DATABASE_URL": settings.database.url,
        "DOCQUEUE_REDIS_URL": settings.broker.url,
        "DOCQUEUE_MAX_CONCURRENT_EXPORTS": str(MAX_EXPORTS),
        "DOCQUEUE_EXPORT_SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [docqueue_bin(), "api", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"docqueue api did not start:\n{log.read_text()}")
        time.sleep(0.2)


def _big_job(settings: Settings, api: str, key: str, model: str) -> str:
    body = "text\n" + "".join(f"document {i}\n" for i in range(ROWS))
    job_id = str(post_job(api, key, body, task="summarize", model=model)["id"])
    with pg(settings.database.url) as conn:
        conn.execute(
            "INSERT INTO results (job_id, idx, output) "
            "SELECT job_id, idx, text || ': ' || repeat('x', 1000) FROM documents "
            "WHERE job_id = %s",
            (uuid.UUID(job_id),),
        )
    return job_id


class StalledReader:
    """A client that asks for the results, reads the response head, then reads nothing more."""

    def __init__(self, api: str, key: str, job_id: str) -> None:
        url = httpx.URL(api)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        assert url.port is not None
        self.sock.connect((url.host, url.port))
        self.sock.sendall(
            f"GET /v1/jobs/{job_id}/results?format=csv HTTP/1.1\r\nHost: {url.host}\r\n"
            f"Authorization: Bearer {key}\r\n\r\n".encode()
        )
        data = b""
        self.status = 0  # no answer (within the socket's timeout)
        self.headers: dict[str, str] = {}
        self.body = b""
        while b"\r\n\r\n" not in data:
            try:
                got = self.sock.recv(1024)
            except TimeoutError:
                return
            assert got, f"connection closed before the response head: {data!r}"
            data += got
        head, _, self.body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {
            k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])
        }

    def read_exactly(self, n: int) -> bytes:
        while len(self.body) < n:
            got = self.sock.recv(65536)
            assert got, "connection closed early"
            self.body += got
        return self.body[:n]

    def read_to_end(self) -> bytes:
        """Everything still coming until the server closes the connection."""
        while got := self.sock.recv(65536):
            self.body += got
        return self.body


def _timed_get(url: str, headers: dict[str, str]) -> tuple[int, float]:
    """Status (0: no answer within 10 s) and seconds taken."""
    started = time.monotonic()
    try:
        status = httpx.get(url, headers=headers, timeout=10).status_code
    except httpx.TimeoutException:
        status = 0
    return status, time.monotonic() - started


def test_stalled_downloads_are_bounded_cut_off_and_never_starve_the_api(
    settings: Settings, bounded_api: str, api_key: str, model_name: str
) -> None:
    job_id = _big_job(settings, bounded_api, api_key, model_name)
    auth = {"Authorization": f"Bearer {api_key}"}
    readers = [StalledReader(bounded_api, api_key, job_id) for _ in range(STALLED)]
    try:
        # (a) While they stall, the API answers everything else at once.
        for path in (f"/v1/jobs/{job_id}", "/readyz", "/healthz"):
            status, took = _timed_get(f"{bounded_api}{path}", headers=auth)
            said = status or "no answer"
            assert status == 200 and took < 1.0, f"GET {path}: {said} in {took:.1f} s"
        assert all(r.status for r in readers), "some downloads got no answer at all"

        # (b) MAX_EXPORTS downloads run; every one past them is refused with a retry hint.
        accepted = [r for r in readers if r.status == 200]
        refused = [r for r in readers if r.status != 200]
        assert len(accepted) == MAX_EXPORTS
        for r in refused:
            assert r.status == 503, r.status
            assert int(r.headers["retry-after"]) > 0
            error = json.loads(r.read_exactly(int(r.headers["content-length"])))["error"]
            assert error["code"] == "exports_busy"
            assert "DOCQUEUE_MAX_CONCURRENT_EXPORTS" in error["message"]

        # (c) Past the send timeout the stalled downloads are cut off and their slots are free:
        # a new download runs to the end.
        deadline = time.monotonic() + SEND_TIMEOUT_S + 10
        while True:
            resp = httpx.get(f"{bounded_api}/v1/jobs/{job_id}/results", headers=auth, timeout=30)
            if resp.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert resp.status_code == 200, resp.text
        assert len(resp.text.splitlines()) == ROWS + 1  # the header and every row
        for r in accepted:
            body = r.read_to_end()
            # A broken transfer: the connection closed without the final empty chunk.
            assert not body.endswith(b"0\r\n\r\n") and len(body) < len(resp.content)
    finally:
        for r in readers:
            r.sock.close()
