"""The HTTP boundary of a real `docqueue api` process, driven over a raw socket the way an
attacker's client would: a chunked upload (no Content-Length) that never ends. The server must
answer before it has read the body (no key: 401) or once the bytes received pass the limit
(413), and it must not spool what it refused: its writes (``/proc/<pid>/io``, ``wchar``: every
byte a temporary file got) stay small."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.support.stack import docqueue_bin, free_port

MiB = 1024 * 1024
CHUNK = 64 * 1024
SMALL_UPLOAD = 2 * MiB
SMALL_JSON = 16 * 1024


@dataclass
class Api:
    url: str
    proc: subprocess.Popen[bytes]
    tmpdir: Path

    def written(self) -> int:
        """Bytes the process has passed to write(2) so far: files, sockets, its log."""
        for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
        raise AssertionError("no wchar in /proc/<pid>/io")


@contextmanager
def running_api(settings: Settings, tmp: Path, **env: str) -> Iterator[Api]:
    """A `docqueue api` of its own (limits from ``env``), its TMPDIR under ``tmp``."""
    tmpdir = tmp / "tmp"
    tmpdir.mkdir()
    port = free_port()
    log = tmp / "api.log"
    full_env = {
        **os.environ,
        "DOCQUEUE_DATABASE_URL": settings.database.url,
        "DOCQUEUE_REDIS_URL": settings.broker.url,
        "TMPDIR": str(tmpdir),
        **env,
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [docqueue_bin(), "api", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docqueue api did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield Api(url, proc, tmpdir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def default_api(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """Default limits (an upload may be gigabytes)."""
    with running_api(settings, tmp_path_factory.mktemp("api-default")) as api:
        yield api


@pytest.fixture(scope="module")
def small_api(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with running_api(
        settings,
        tmp_path_factory.mktemp("api-small"),
        DOCQUEUE_MAX_UPLOAD_BYTES=str(SMALL_UPLOAD),
        DOCQUEUE_MAX_JSON_BYTES=str(SMALL_JSON),
    ) as api:
        yield api


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the server took from us before it answered


def chunked_request(
    url: str,
    path: str,
    headers: dict[str, str],
    head: bytes,
    total: int,
    timeout_s: float = 60,
) -> Answer:
    """POSTs ``head`` then filler, chunk-encoded, up to ``total`` bytes, and stops sending the
    moment the server answers (non-blocking: a server that stops reading cannot wedge us)."""
    host, port = url.removeprefix("http://").split(":")
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Transfer-Encoding: chunked"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    sock.setblocking(False)
    pending = f"{len(head):x}\r\n".encode() + head + b"\r\n"
    sent = 0
    filler = b"x" * (CHUNK - 1) + b"\n"
    frame = f"{len(filler):x}\r\n".encode() + filler + b"\r\n"
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if sent < total else [], [], 1)
            if readable:
                break
            if writable:
                if not pending:
                    pending = frame
                try:
                    n = sock.send(pending)
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break  # closed on us: read what it said
                pending = pending[n:]
                sent += n
        sock.setblocking(True)
        sock.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _expected(data):
            try:
                got = sock.recv(65536)
            except ConnectionResetError:
                break
            if not got:
                break
            data += got
    finally:
        sock.close()
    head_part, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_part.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 "), data[:200]
    parsed = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return Answer(int(status_line.split()[1]), parsed, body, sent)


def _expected(data: bytes) -> int:
    head, sep, _ = data.partition(b"\r\n\r\n")
    if not sep:
        return 1 << 62
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return 1 << 62


def multipart_head(boundary: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="task"\r\n\r\nsummarize\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n'
        "Content-Type: text/csv\r\n\r\ntext\n"
    ).encode()


def new_key(settings: Settings) -> str:
    from service.store.engine import session_scope
    from service.store.keys import create_key

    with session_scope(settings.database.url) as session:
        return create_key(session, f"boundary-{os.getpid()}-{time.monotonic_ns()}")


def test_unauthenticated_200mb_upload_is_refused_before_it_is_read(default_api: Api) -> None:
    before = default_api.written()
    answer = chunked_request(
        default_api.url,
        "/v1/jobs",
        {"Content-Type": "multipart/form-data; boundary=zz"},
        multipart_head("zz"),
        total=200 * MiB,
    )
    assert answer.status == 401, answer
    assert answer.headers["www-authenticate"] == "Bearer"
    assert json.loads(answer.body)["error"]["code"] == "unauthorized"
    assert answer.sent < 8 * MiB, f"the server let us send {answer.sent} bytes first"
    assert default_api.written() - before < MiB  # nothing spooled: only its answer and log
    assert list(default_api.tmpdir.iterdir()) == []


def test_authenticated_upload_past_the_limit_is_413_after_about_the_limit(
    small_api: Api, settings: Settings
) -> None:
    key = new_key(settings)
    before = small_api.written()
    answer = chunked_request(
        small_api.url,
        "/v1/jobs",
        {"Authorization": f"Bearer {key}", "Content-Type": "multipart/form-data; boundary=zz"},
        multipart_head("zz"),
        total=200 * MiB,
    )
    assert answer.status == 413, answer
    err = json.loads(answer.body)["error"]
    assert err["code"] == "payload_too_large" and err["limit"] == SMALL_UPLOAD
    assert "DOCQUEUE_MAX_UPLOAD_BYTES" in err["message"]
    # What was in flight (socket buffers) on top of the limit, never the whole 200 MB.
    assert answer.sent < SMALL_UPLOAD + 8 * MiB, answer.sent
    assert small_api.written() - before < SMALL_UPLOAD + MiB  # spooled at most the limit


def test_json_body_past_max_json_bytes_is_413(small_api: Api, settings: Settings) -> None:
    key = new_key(settings)
    body = json.dumps({"collection": "c", "cron": "@daily", "params": {"prompt": "x" * MiB}})
    resp = httpx.post(
        f"{small_api.url}/v1/schedules",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        content=body.encode(),
        timeout=30,
    )
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["limit"] == SMALL_JSON
    # Chunked, no Content-Length: counted as it arrives.
    answer = chunked_request(
        small_api.url,
        "/v1/schedules",
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        b'{"collection": "c", "cron": "@daily", "params": {"prompt": "',
        total=50 * MiB,
    )
    assert answer.status == 413, answer
    assert answer.sent < SMALL_JSON + 8 * MiB


def test_a_normal_upload_still_goes_through(small_api: Api, settings: Settings) -> None:
    key = new_key(settings)
    resp = httpx.post(
        f"{small_api.url}/v1/jobs",
        headers={"Authorization": f"Bearer {key}"},
        data={"task": "summarize", "model": "boundary-test-model"},
        files={"file": ("docs.csv", b"text\n" + b"word\n" * 10_000, "text/csv")},
        timeout=60,
    )
    assert resp.status_code == 202, resp.text
