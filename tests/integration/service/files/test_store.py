"""The file store on the real PostgreSQL: bytes kept in bounded parts and read back streamed,
line by line for batches, pages by (created_at, id), tenants apart, quota counted, expiry
purged."""

from __future__ import annotations

import hashlib
import io
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.errors import BadInputError, NotFoundError, PayloadTooLargeError, QuotaExceededError
from service.files import store
from service.settings import Settings
from service.store.engine import get_engine, session_scope
from service.store.keys import authenticate, create_key
from service.store.tables import File
from tests.support.helpers import override, pg

PART = 4096


@pytest.fixture(scope="module")
def small(settings: Settings) -> Settings:
    """Parts of 4 KiB, so a few KiB make a multi-part file."""
    return override(settings, files={"part_bytes": PART}, jobs={"max_upload_bytes": 64 * 1024})


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    return get_engine(settings.database.url)


def new_tenant(settings: Settings) -> uuid.UUID:
    with session_scope(settings.database.url) as session:
        key = create_key(session, f"files-{uuid.uuid4().hex[:8]}")
        return authenticate(session, f"Bearer {key}").tenant_id


def upload(
    engine: Engine,
    settings: Settings,
    tenant: uuid.UUID,
    data: bytes,
    expires_after_s: int | None = None,
) -> File:
    with Session(engine, expire_on_commit=False) as session, session.begin():
        return store.create(
            session,
            tenant,
            io.BytesIO(data),
            filename="in.jsonl",
            purpose="batch",
            expires_after_s=expires_after_s,
            settings=settings,
        )


def parts_of(settings: Settings, file_id: uuid.UUID) -> list[int]:
    with pg(settings.database.url) as conn:
        rows = conn.execute(
            "SELECT length(data) FROM file_parts WHERE file_id = %s ORDER BY seq", (file_id,)
        ).fetchall()
    return [int(r[0]) for r in rows]


def test_an_upload_is_stored_in_bounded_parts_and_read_back_equal(
    small: Settings, engine: Engine
) -> None:
    tenant = new_tenant(small)
    data = bytes(range(256)) * 50  # 12,800 bytes: three full parts and a short one
    row = upload(engine, small, tenant, data)
    assert row.status == "processed" and row.bytes == len(data)
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    assert parts_of(small, row.id) == [PART, PART, PART, len(data) - 3 * PART]
    pieces = list(store.iter_parts(engine, row))
    assert [len(p) for p in pieces] == [PART, PART, PART, len(data) - 3 * PART]
    assert b"".join(pieces) == data


def test_open_lines_splits_across_parts(small: Settings, engine: Engine) -> None:
    tenant = new_tenant(small)
    lines = [
        f'{{"custom_id": "r{i}", "pad": "{"x" * (i * 37 % 900)}"}}'.encode() for i in range(40)
    ]
    data = b"\n".join(lines[:20]) + b"\r\n" + b"\n".join(lines[20:]) + b"\n\n"
    row = upload(engine, small, tenant, data)
    assert len(parts_of(small, row.id)) > 3
    got = list(store.open_lines(engine, tenant, row.id, max_line_bytes=1000))
    assert got == [*lines, b""]  # CRLF stripped; the blank line kept, so numbers hold


def test_open_lines_refuses_a_line_over_the_limit_naming_it(
    small: Settings, engine: Engine
) -> None:
    tenant = new_tenant(small)
    row = upload(engine, small, tenant, b"short\n" + b"y" * 9000 + b"\nafter\n")
    with pytest.raises(BadInputError, match="line 2 ") as caught:
        list(store.open_lines(engine, tenant, row.id, max_line_bytes=5000))
    assert caught.value.where["line"] == 2
    exact = upload(engine, small, tenant, b"a" * 5000 + b"\r\n" + b"b" * 5000)
    sizes = [len(x) for x in store.open_lines(engine, tenant, exact.id, max_line_bytes=5000)]
    assert sizes == [5000, 5000]  # at the limit, CR not counted; the last line without \n
    last = upload(engine, small, tenant, b"a\n" + b"b" * 5001)
    with pytest.raises(BadInputError, match="line 2 "):
        list(store.open_lines(engine, tenant, last.id, max_line_bytes=5000))


def test_another_tenants_file_is_not_found(small: Settings, engine: Engine) -> None:
    owner, other = new_tenant(small), new_tenant(small)
    row = upload(engine, small, owner, b"{}\n")
    with Session(engine) as session:
        assert store.get(session, owner, row.id).id == row.id
        with pytest.raises(NotFoundError, match=store.public_id(row.id)):
            store.get(session, other, row.id)
    with pytest.raises(NotFoundError):
        store.delete_file(engine, other, row.id, small)
    with pytest.raises(NotFoundError):
        list(store.open_lines(engine, other, row.id, max_line_bytes=100))


def test_pages_by_created_at_with_after_both_orders(small: Settings, engine: Engine) -> None:
    tenant = new_tenant(small)
    made = [upload(engine, small, tenant, f"{i}\n".encode()).id for i in range(5)]
    with Session(engine) as session:
        seen: list[uuid.UUID] = []
        after = None
        while True:
            page = store.list_files(session, tenant, limit=2, after=after)
            seen += [f.id for f in page.files]
            if not page.has_more:
                break
            after = page.files[-1].id
        assert seen == made[::-1]  # newest first, each once
        asc = store.list_files(session, tenant, limit=10, order="asc")
        assert [f.id for f in asc.files] == made and not asc.has_more
        rest = store.list_files(session, tenant, limit=10, order="asc", after=made[1])
        assert [f.id for f in rest.files] == made[2:]
        with pytest.raises(BadInputError, match="after"):
            store.list_files(session, tenant, limit=1, after=uuid.uuid4())


def test_refused_uploads_leave_nothing(small: Settings, engine: Engine) -> None:
    tenant = new_tenant(small)
    with pytest.raises(PayloadTooLargeError, match="DOCQUEUE_MAX_UPLOAD_BYTES"):
        upload(engine, small, tenant, b"z" * (64 * 1024 + 1))
    with pytest.raises(BadInputError, match="empty"):
        upload(engine, small, tenant, b"")
    with pg(small.database.url) as conn:
        row = conn.execute("SELECT count(*) FROM files WHERE tenant_id = %s", (tenant,)).fetchone()
    assert row is not None and row[0] == 0


def test_uploads_count_against_the_daily_upload_quota(settings: Settings, engine: Engine) -> None:
    tight = override(settings, quotas={"upload_bytes_per_day": 100})
    tenant = new_tenant(tight)
    upload(engine, tight, tenant, b"a" * 60)
    with pytest.raises(QuotaExceededError, match="upload_bytes_per_day") as caught:
        upload(engine, tight, tenant, b"b" * 60)
    assert "this file adds 60 bytes" in caught.value.message
    with pg(settings.database.url) as conn:
        row = conn.execute(
            "SELECT sum(upload_bytes), min(model) FROM usage_daily WHERE tenant_id = %s", (tenant,)
        ).fetchone()
    assert row == (60, store.FILES_LEDGER_MODEL)


def test_a_writer_appends_parts_and_shows_the_file_only_when_closed(
    small: Settings, engine: Engine
) -> None:
    tenant = new_tenant(small)
    with store.FileWriter(engine, tenant, filename="out.jsonl", settings=small) as out:
        for i in range(300):
            out.write(f'{{"id": "batch_req_{i}", "custom_id": "r{i}"}}\n'.encode())
        with Session(engine) as session, pytest.raises(NotFoundError):
            store.get(session, tenant, out.file.id)  # still being written: invisible
        assert len(parts_of(small, out.file.id)) >= 2  # full parts already stored
    assert out.file.status == "processed" and out.file.purpose == "batch_output"
    lines = list(store.open_lines(engine, tenant, out.file.id, max_line_bytes=100))
    assert len(lines) == 300 and lines[299] == b'{"id": "batch_req_299", "custom_id": "r299"}'
    assert out.file.expires_at is not None

    with (
        pytest.raises(RuntimeError),
        store.FileWriter(engine, tenant, filename="err.jsonl", settings=small) as failed,
    ):
        failed.write(b"x" * (3 * PART))
        raise RuntimeError("the batch failed")
    assert parts_of(small, failed.file.id) == []  # aborted: deleted


def test_expired_files_are_purged_in_batches(small: Settings, engine: Engine) -> None:
    tenant = new_tenant(small)
    gone = upload(engine, small, tenant, b"q" * (10 * PART), expires_after_s=3600)
    kept = upload(engine, small, tenant, b"k\n")  # the default: 30 days
    assert gone.expires_at == gone.created_at + timedelta(seconds=3600)
    assert kept.expires_at == kept.created_at + timedelta(days=30)
    later = datetime.now(UTC) + timedelta(seconds=3601)
    batches = override(small, files={"part_bytes": PART, "purge_batch_parts": 3})
    report = store.purge_expired(engine, batches, now=later)
    assert report.complete and report.files >= 1 and report.parts >= 10
    assert parts_of(small, gone.id) == []
    with Session(engine) as session:
        with pytest.raises(NotFoundError):
            store.get(session, tenant, gone.id)
        assert store.get(session, tenant, kept.id).id == kept.id


def test_delete_removes_a_large_file_in_batches_and_a_second_delete_is_404(
    small: Settings, engine: Engine
) -> None:
    tenant = new_tenant(small)
    row = upload(engine, small, tenant, b"d" * (7 * PART + 1))
    assert len(parts_of(small, row.id)) == 8
    store.delete_file(engine, tenant, row.id, override(small, files={"purge_batch_parts": 3}))
    assert parts_of(small, row.id) == []
    with pg(small.database.url) as conn:
        assert conn.execute("SELECT 1 FROM files WHERE id = %s", (row.id,)).fetchone() is None
    with pytest.raises(NotFoundError):
        store.delete_file(engine, tenant, row.id, small)
