"""Files (``/v1/files``) in PostgreSQL: a ``files`` row and its bytes in ``file_parts``.

API processes on several hosts share no disk, so the database holds the bytes, in parts of at
most ``settings.files.part_bytes``: no write or read ever holds more than a part in memory.

- ``create`` stores an upload, read from a (spooled) file in parts, in the caller's
  transaction: a refused upload (too large, empty, over the tenant's daily upload quota) is
  rolled back and leaves nothing behind.
- ``FileWriter`` writes a file docqueue makes (a batch's output and error files): each part in
  its own short transaction, so a batch that writes for hours holds no transaction; the file
  stays invisible (``uploaded``) until ``close`` makes it ``processed``, and an abandoned one
  is purged at its expiry like any other.
- ``iter_parts`` and ``open_lines`` read a file part by part, each part in its own query, so a
  slow reader holds no connection or snapshot (parts never change once written).
- ``purge_expired`` (retention) deletes files past ``expires_at``, parts in batches.

Ids are rendered as OpenAI's (``file-<32 hex>``) over a uuid primary key.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import BinaryIO, Literal

from sqlalchemy import Engine, and_, delete, func, insert, or_, select, text, tuple_, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from service.errors import BadInputError, NotFoundError, PayloadTooLargeError
from service.settings import Settings
from service.store import quotas
from service.store.tables import File, FilePart

_PUBLIC_ID = re.compile(r"file-([0-9a-f]{32})")
#: ``usage_daily.model`` of a file upload's ledger row: no model is spelled with parentheses,
#: so it never merges with a job's row (see ``record_upload``).
FILES_LEDGER_MODEL = "(files)"

Purpose = Literal["batch", "batch_output"]
Order = Literal["asc", "desc"]


def public_id(file_id: uuid.UUID) -> str:
    return f"file-{file_id.hex}"


def parse_id(value: str) -> uuid.UUID:
    """The uuid behind ``file-<hex>``; anything else names no file (404, never a 500)."""
    match = _PUBLIC_ID.fullmatch(value)
    if match is None:
        raise NotFoundError(f"No such File object: {value}", param="file_id")
    return uuid.UUID(match.group(1))


def _not_found(file_id: uuid.UUID) -> NotFoundError:
    return NotFoundError(f"No such File object: {public_id(file_id)}", param="file_id")


def _visible(now: datetime | None = None) -> list[ColumnElement[bool]]:
    """Complete and not expired: what a tenant sees (retention purges the expired later)."""
    cutoff = now if now is not None else func.now()
    return [File.status == "processed", or_(File.expires_at.is_(None), File.expires_at > cutoff)]


class _Parts:
    """Appends bytes to a file as parts of exactly ``part_bytes`` (the last one shorter),
    counting and hashing them; refuses to pass ``max_bytes``."""

    def __init__(self, file_id: uuid.UUID, part_bytes: int, max_bytes: int, setting: str) -> None:
        self.file_id = file_id
        self.part_bytes = part_bytes
        self.max_bytes = max_bytes
        self.setting = setting
        self.buffer = bytearray()
        self.seq = 0
        self.total = 0
        self.sha = hashlib.sha256()

    def add(self, data: bytes) -> list[tuple[int, bytes]]:
        """Takes ``data``; returns the parts now full, numbered, for the caller to insert."""
        if self.total + len(data) > self.max_bytes:
            raise PayloadTooLargeError(
                f"the file exceeds the limit of {self.max_bytes} bytes ({self.setting})",
                param="file",
                limit=self.max_bytes,
            )
        self.total += len(data)
        self.sha.update(data)
        self.buffer += data
        full: list[tuple[int, bytes]] = []
        while len(self.buffer) >= self.part_bytes:
            full.append((self.seq, bytes(self.buffer[: self.part_bytes])))
            del self.buffer[: self.part_bytes]
            self.seq += 1
        return full

    def rest(self) -> list[tuple[int, bytes]]:
        if not self.buffer:
            return []
        last = [(self.seq, bytes(self.buffer))]
        self.buffer.clear()
        self.seq += 1
        return last

    def rows(self, parts: list[tuple[int, bytes]]) -> list[dict[str, object]]:
        return [{"file_id": self.file_id, "seq": seq, "data": data} for seq, data in parts]


def _insert_parts(session: Session, parts: _Parts, full: list[tuple[int, bytes]]) -> None:
    if full:
        session.execute(insert(FilePart), parts.rows(full))


def create(
    session: Session,
    tenant_id: uuid.UUID,
    source: BinaryIO,
    *,
    filename: str,
    purpose: Purpose,
    expires_after_s: int | None,
    settings: Settings,
) -> File:
    """Stores ``source`` (read ``part_bytes`` at a time) as a new ``processed`` file, in the
    caller's transaction, and counts its bytes against the tenant's daily upload quota (under
    the lock ``quotas.check_file_upload`` takes, so concurrent uploads cannot both slip under
    it). An empty file or one over ``max_upload_bytes`` is refused. It expires
    ``expires_after_s`` (default ``files.default_expires_s``) after its ``created_at``, both
    read from the database's clock."""
    life = timedelta(seconds=expires_after_s or settings.files.default_expires_s)
    row = File(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        filename=filename,
        purpose=purpose,
        status="uploaded",
        expires_at=func.now() + life,
    )
    session.add(row)
    session.flush()
    size = settings.files.part_bytes
    parts = _Parts(row.id, size, settings.jobs.max_upload_bytes, "DOCQUEUE_MAX_UPLOAD_BYTES")
    while data := source.read(size):
        _insert_parts(session, parts, parts.add(data))
    _insert_parts(session, parts, parts.rest())
    if parts.total == 0:
        raise BadInputError("the file is empty", param="file")
    quotas.check_file_upload(session, tenant_id, parts.total, settings)
    quotas.record_upload(session, tenant_id, row.id, FILES_LEDGER_MODEL, parts.total)
    row.bytes = parts.total
    row.sha256 = parts.sha.hexdigest()
    row.status = "processed"
    session.flush()
    session.refresh(row)  # created_at and expires_at, from the database's clock
    return row


class FileWriter:
    """Writes a file docqueue makes (a batch's ``batch_output``), part by part, each part in
    its own short transaction; invisible until ``close``. Used as a context manager, an
    exception deletes what was written::

        with FileWriter(engine, tenant_id, filename="out.jsonl", settings=s) as out:
            for line in lines:
                out.write(line)
        out.file  # the processed File
    """

    def __init__(
        self,
        engine: Engine,
        tenant_id: uuid.UUID,
        *,
        filename: str,
        settings: Settings,
        purpose: Purpose = "batch_output",
        expires_at: datetime | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.engine = engine
        if expires_at is None:
            expires_at = datetime.fromtimestamp(time.time() + settings.files.default_expires_s, UTC)
        with Session(engine, expire_on_commit=False) as session, session.begin():
            row = File(
                id=uuid.uuid4(),
                tenant_id=tenant_id,
                filename=filename,
                purpose=purpose,
                status="uploaded",
                expires_at=expires_at,
            )
            session.add(row)
        self.file: File = row
        limit = max_bytes if max_bytes is not None else settings.jobs.max_upload_bytes
        setting = "max_bytes" if max_bytes is not None else "DOCQUEUE_MAX_UPLOAD_BYTES"
        self._parts = _Parts(row.id, settings.files.part_bytes, limit, setting)

    @property
    def id(self) -> str:
        return public_id(self.file.id)

    def write(self, data: bytes) -> None:
        self._store(self._parts.add(data))

    def _store(self, full: list[tuple[int, bytes]]) -> None:
        if full:
            with Session(self.engine) as session, session.begin():
                _insert_parts(session, self._parts, full)

    def close(self) -> File:
        """Writes the last part and makes the file ``processed`` (visible)."""
        self._store(self._parts.rest())
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            session.execute(
                update(File)
                .where(File.id == self.file.id)
                .values(
                    bytes=self._parts.total, sha256=self._parts.sha.hexdigest(), status="processed"
                )
            )
            self.file = session.get_one(File, self.file.id)
        return self.file

    def abort(self) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(delete(File).where(File.id == self.file.id))

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def get(session: Session, tenant_id: uuid.UUID, file_id: uuid.UUID) -> File:
    """The tenant's file; another tenant's, an incomplete or an expired one is a 404."""
    row = session.scalar(
        select(File).where(File.id == file_id, File.tenant_id == tenant_id, *_visible())
    )
    if row is None:
        raise _not_found(file_id)
    return row


@dataclass(frozen=True)
class FilePage:
    files: list[File]
    has_more: bool


def list_files(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    limit: int,
    after: uuid.UUID | None = None,
    order: Order = "desc",
    purpose: Purpose | None = None,
) -> FilePage:
    """A page of the tenant's files by ``created_at`` (then id), after the file ``after``."""
    query = select(File).where(File.tenant_id == tenant_id, *_visible())
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    key = tuple_(File.created_at, File.id)
    if after is not None:
        mark = session.execute(
            select(File.created_at, File.id).where(File.id == after, File.tenant_id == tenant_id)
        ).one_or_none()
        if mark is None:
            raise BadInputError(f"after: no such File object: {public_id(after)}", param="after")
        bound = tuple_(mark.created_at, mark.id)
        query = query.where(key < bound if order == "desc" else key > bound)
    if order == "desc":
        query = query.order_by(File.created_at.desc(), File.id.desc())
    else:
        query = query.order_by(File.created_at, File.id)
    rows = list(session.scalars(query.limit(limit + 1)))
    return FilePage(rows[:limit], len(rows) > limit)


def delete_file(
    engine: Engine, tenant_id: uuid.UUID, file_id: uuid.UUID, settings: Settings
) -> None:
    """Deletes the tenant's file (404 if it sees none): first expires it, so it is gone for
    every reader at once, then deletes its parts ``purge_batch_parts`` per transaction, so a
    large file holds no long transaction; if this process stops midway, retention finishes."""
    with Session(engine) as session, session.begin():
        get(session, tenant_id, file_id)
        session.execute(update(File).where(File.id == file_id).values(expires_at=func.now()))
    while not _purge_some(engine, file_id, settings.files.purge_batch_parts)[1]:
        pass


def _purge_some(engine: Engine, file_id: uuid.UUID, batch: int) -> tuple[int, bool]:
    """Deletes up to ``batch`` of a file's parts, and the file once none is left: the parts
    deleted, and whether the file is gone."""
    with engine.begin() as conn:
        deleted = conn.execute(
            text(
                "DELETE FROM file_parts WHERE file_id = :f AND seq IN "
                "(SELECT seq FROM file_parts WHERE file_id = :f ORDER BY seq LIMIT :n)"
            ),
            {"f": file_id, "n": batch},
        ).rowcount
        if deleted < batch:
            conn.execute(delete(File).where(File.id == file_id))
            return deleted, True
        return deleted, False


def iter_parts(engine: Engine, file: File) -> Iterator[bytes]:
    """The file's bytes, a part at a time, each part read in its own query (no connection is
    held between parts). A file deleted or purged meanwhile ends the stream with a 404 error
    rather than a short file."""
    sent = seq = 0
    query = text("SELECT data FROM file_parts WHERE file_id = :f AND seq = :s")
    while sent < file.bytes:
        with engine.connect() as conn:
            data = conn.execute(query, {"f": file.id, "s": seq}).scalar_one_or_none()
        if data is None:
            raise NotFoundError(
                f"{public_id(file.id)} was deleted while it was read", param="file_id"
            )
        chunk = bytes(data)
        sent += len(chunk)
        seq += 1
        yield chunk


def open_lines(
    engine: Engine, tenant_id: uuid.UUID, file_id: uuid.UUID, *, max_line_bytes: int
) -> Iterator[bytes]:
    """The tenant's file, line by line (without ``\\n`` or ``\\r\\n``; blank lines
    included, so ``enumerate(..., start=1)`` numbers them as an editor does), streamed part by
    part. A line over ``max_line_bytes`` is a ``BadInputError`` naming its number."""
    with Session(engine) as session:
        file = get(session, tenant_id, file_id)
        session.expunge(file)

    def too_long(number: int) -> BadInputError:
        return BadInputError(
            f"line {number} of {public_id(file_id)} is longer than {max_line_bytes} bytes",
            line=number,
        )

    def checked(line: bytes, number: int) -> bytes:
        line = line[:-1] if line.endswith(b"\r") else line
        if len(line) > max_line_bytes:
            raise too_long(number)
        return line

    buffer = bytearray()
    number = 0
    for part in iter_parts(engine, file):
        buffer += part
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            number += 1
            yield checked(bytes(buffer[start:end]), number)
            start = end + 1
        del buffer[:start]
        if len(buffer) > max_line_bytes + 1:  # no newline yet, and already too long
            raise too_long(number + 1)
    if buffer:
        yield checked(bytes(buffer), number + 1)


@dataclass
class PurgeReport:
    files: int = 0
    parts: int = 0
    complete: bool = True


def purge_expired(engine: Engine, settings: Settings, now: datetime | None = None) -> PurgeReport:
    """Deletes files past ``expires_at`` (complete or abandoned by their writer), their parts
    ``purge_batch_parts`` per transaction, within ``retention.max_pass_s`` (the next pass
    resumes)."""
    now = now or datetime.now(UTC)
    deadline = time.monotonic() + settings.retention.max_pass_s
    batch = settings.files.purge_batch_parts
    report = PurgeReport()
    while True:
        with engine.connect() as conn:
            ids = list(
                conn.execute(
                    select(File.id)
                    .where(and_(File.expires_at.is_not(None), File.expires_at <= now))
                    .order_by(File.expires_at)
                    .limit(100)
                ).scalars()
            )
        if not ids:
            return report
        for file_id in ids:
            while True:
                if time.monotonic() > deadline:
                    report.complete = False
                    return report
                deleted, gone = _purge_some(engine, file_id, batch)
                report.parts += deleted
                if gone:
                    report.files += 1
                    break
