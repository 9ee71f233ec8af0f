"""JSON Lines and Parquet uploads through POST /v1/jobs: the same rows as the CSV they were
made from, and hostile files refused with where, before anything is stored."""

from __future__ import annotations

import csv
import io
import json
import struct
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.support.helpers import documents, submit, tenant_totals

CSV = (
    "id,text,lang,source\n"
    'a1,"Hello, world",en,web\n'
    'a2,"line one\nline two\r\nline three",en,mail\n'
    "a3,Grüße aus Köln — 東京 🚀,de,web\n"
    'a4,"She said ""hi""",en,\n'
    'a5,"tab\there, back\\\\slash",,x\n'
)


def csv_rows() -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(CSV, newline="")))


def as_jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def as_parquet(table: pa.Table, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    return buf.getvalue()


def stored(client: TestClient, key: str, settings: Settings, body: bytes, **fields: Any) -> Any:
    resp = submit(client, key, body, id_column="id", **fields)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    return job, documents(settings.database.url, job["id"])


@pytest.fixture()
def csv_job(client: TestClient, api_key: str, settings: Settings, model_name: str) -> Any:
    return stored(client, api_key, settings, CSV.encode(), model=model_name)


def test_jsonl_stores_the_csv_rows(
    client: TestClient, api_key: str, settings: Settings, model_name: str, csv_job: Any
) -> None:
    body = b"\xef\xbb\xbf" + as_jsonl(csv_rows()).replace(b"\n", b"\r\n\n", 1)  # BOM, blank line
    job, rows = stored(client, api_key, settings, body, model=model_name, filename="docs.jsonl")
    assert rows == csv_job[1]
    assert job["params"]["extra_columns"] == csv_job[0]["params"]["extra_columns"]
    # From the content alone (no telling name), and with format given over a wrong name.
    for fields in ({"filename": "upload"}, {"filename": "docs.csv", "format": "jsonl"}):
        _, again = stored(client, api_key, settings, body, model=model_name, **fields)
        assert again == csv_job[1]


def test_jsonl_values_other_than_strings(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    lines: list[dict[str, Any]] = [
        {"id": 7, "text": "a\u0000b", "n": 1.5, "ok": True, "tags": ["x", "é"], "gone": None},
        {"id": "8", "text": None, "n": 2},  # keys left out: empty
    ]
    body = as_jsonl(lines)
    _, rows = stored(client, api_key, settings, body, model=model_name, filename="d.jsonl")
    assert rows == [
        (1, "7", "ab", {"n": "1.5", "ok": "true", "tags": '["x", "é"]', "gone": ""}),
        (2, "8", "", {"n": "2", "ok": "", "tags": "", "gone": ""}),
    ]


def test_parquet_stores_the_csv_rows(
    client: TestClient, api_key: str, settings: Settings, model_name: str, csv_job: Any
) -> None:
    table = pa.Table.from_pylist(csv_rows())
    for kwargs in ({}, {"use_dictionary": False, "compression": "zstd"}):
        body = as_parquet(table, row_group_size=2, **kwargs)
        job, rows = stored(
            client, api_key, settings, body, model=model_name, filename="docs.parquet"
        )
        assert rows == csv_job[1]
        assert job["params"]["extra_columns"] == csv_job[0]["params"]["extra_columns"]
    _, rows = stored(client, api_key, settings, body, model=model_name, filename="blob")
    assert rows == csv_job[1]  # PAR1: Parquet from the content


def test_parquet_typed_columns_become_text(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    table = pa.table(
        {
            "id": pa.array([10, 11], pa.int64()),
            "text": pa.array(["x\u0000y", None]),
            "score": pa.array([0.5, None]),
            "flag": pa.array([True, False]),
            "cat": pa.array(["a", "b"]).dictionary_encode(),
        }
    )
    body = as_parquet(table)
    _, rows = stored(client, api_key, settings, body, model=model_name, filename="d.parquet")
    assert rows == [
        (1, "10", "xy", {"score": "0.5", "flag": "true", "cat": "a"}),
        (2, "11", "", {"score": "", "flag": "false", "cat": "b"}),
    ]


# --- hostile files -----------------------------------------------------------------------------


def refused(
    client: TestClient, key: str, settings: Settings, body: bytes, status: int = 400, **fields: Any
) -> dict[str, Any]:
    before = tenant_totals(settings.database.url, key)
    resp = submit(client, key, body, **fields)
    assert resp.status_code == status, resp.text[:2000]
    assert len(resp.content) < 4096
    assert tenant_totals(settings.database.url, key) == before
    return dict(resp.json()["error"])


@pytest.fixture()
def small(settings: Settings) -> Iterator[Settings]:
    jobs = settings.jobs
    old = (jobs.max_jsonl_line_bytes, jobs.max_parquet_row_group_bytes, jobs.max_columns)
    jobs.max_jsonl_line_bytes, jobs.max_parquet_row_group_bytes, jobs.max_columns = 200, 4096, 8
    yield settings
    jobs.max_jsonl_line_bytes, jobs.max_parquet_row_group_bytes, jobs.max_columns = old


def test_jsonl_line_over_the_limit(client: TestClient, api_key: str, small: Settings) -> None:
    body = as_jsonl([{"text": "ok"}, {"text": "ok"}, {"text": "x" * 10_000_000}])
    err = refused(client, api_key, small, body, filename="d.jsonl")
    assert "longer than 200 bytes" in err["message"]
    assert "DOCQUEUE_MAX_JSONL_LINE_BYTES" in err["message"]
    assert (err["line"], err["row"]) == (3, 3)


@pytest.mark.parametrize(
    ("line", "phrase"),
    [
        (b'["a", "b"]', "expected a JSON object, found an array"),
        (b'"just text"', "found a string"),
        (b'{"text": "a",}', "invalid JSON at column"),
        (b'{"text": "caf\xe9"}', "invalid UTF-8"),
        (b'{"text": 12}', "column 'text' is a number"),
        (b'{"text": "a", "new": 1}', "key 'new' is not one of the first line's keys"),
    ],
)
def test_jsonl_bad_line_named(
    client: TestClient, api_key: str, settings: Settings, line: bytes, phrase: str
) -> None:
    body = b'{"text": "first", "other": 1}\n\n' + line + b"\n"
    err = refused(client, api_key, settings, body, filename="d.ndjson")
    assert phrase in err["message"], err
    assert "line 3 (row 2)" in err["message"]
    assert (err["line"], err["row"]) == (3, 2)


def garbled(body: bytes) -> bytes:
    """The file with every data byte overwritten, footer intact: reading any data fails."""
    (meta_len,) = struct.unpack("<I", body[-8:-4])
    footer = len(body) - 8 - meta_len
    return b"PAR1" + b"\xff" * (footer - 4) + body[footer:]


def test_parquet_too_many_columns_refused_from_metadata(
    client: TestClient, api_key: str, small: Settings
) -> None:
    table = pa.table({"text": ["a"], **{f"c{i}": [i] for i in range(20)}})
    err = refused(client, api_key, small, garbled(as_parquet(table)), filename="d.parquet")
    assert "the file has 21 columns; the limit is 8" in err["message"]


def test_parquet_row_group_over_the_limit_refused_from_metadata(
    client: TestClient, api_key: str, small: Settings
) -> None:
    table = pa.table({"text": [f"document {i} " * 20 for i in range(400)]})
    body = as_parquet(table, row_group_size=100, compression="zstd")
    assert len(body) < 4096 * 4  # compressed, but not small uncompressed
    err = refused(client, api_key, small, garbled(body), filename="d.parquet")
    assert "row group 1 of 4 (100 rows)" in err["message"]
    assert "DOCQUEUE_MAX_PARQUET_ROW_GROUP_BYTES" in err["message"]
    assert err["row_group"] == 1


def test_parquet_text_column_not_strings(
    client: TestClient, api_key: str, settings: Settings
) -> None:
    table = pa.table({"text": pa.array([1, 2], pa.int32()), "b": ["x", "y"]})
    err = refused(client, api_key, settings, garbled(as_parquet(table)), filename="d.parquet")
    assert "text column 'text' has type int32; the text column must be strings" in err["message"]
    assert err["column"] == "text"


def test_parquet_nested_column_and_bad_utf8_and_junk(
    client: TestClient, api_key: str, settings: Settings
) -> None:
    nested = pa.table({"text": ["a"], "tags": pa.array([[1, 2]])})
    err = refused(client, api_key, settings, as_parquet(nested), filename="d.parquet")
    assert "column 'tags' has type list<" in err["message"]
    bad = pa.table({"text": pa.array([b"ok", b"ok", b"\xff"], pa.binary()).view(pa.string())})
    err = refused(client, api_key, settings, as_parquet(bad), filename="d.parquet")
    assert "row 3: column 'text' is not valid UTF-8" in err["message"]
    assert err["row"] == 3
    err = refused(client, api_key, settings, b"PAR1 and then nothing", filename="d.parquet")
    assert "not a Parquet file" in err["message"]
    err = refused(client, api_key, settings, b"text\nx\n", status=422, format="xml")
    assert err["field"] == "format"


def test_parquet_dictionary_bomb_stopped_by_the_stored_size(
    client: TestClient, api_key: str, settings: Settings
) -> None:
    # A few KiB that decode to 200,000 rows of a 60 KB document: one value, many indexes.
    indexes = pa.array([0] * 200_000, pa.int32())
    table = pa.table({"text": pa.DictionaryArray.from_arrays(indexes, pa.array(["x" * 60_000]))})
    body = as_parquet(table, compression="zstd")
    assert len(body) < 64 * 1024
    err = refused(client, api_key, settings, body, filename="d.parquet")
    assert "more than 4 times the file" in err["message"]


def test_lines_across_read_blocks_match_csv(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    # Lines of every length, some longer than a read block (64 KiB): split and joined again.
    rows = [
        {"id": f"r{i}", "text": "é" * (i * 37 % 900) + ("x" * 70_000 if i % 500 == 7 else "")}
        for i in range(3000)
    ]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, ["id", "text"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _, from_csv = stored(client, api_key, settings, buf.getvalue().encode(), model=model_name)
    body = as_jsonl(rows)
    _, from_jsonl = stored(client, api_key, settings, body, model=model_name, filename="d.jsonl")
    assert len(from_jsonl) == 3000
    assert from_jsonl == from_csv


def test_parquet_corrupt_data_pages_are_a_400(
    client: TestClient, api_key: str, settings: Settings
) -> None:
    table = pa.table({"id": [f"r{i}" for i in range(50)], "text": ["doc"] * 50})
    for kwargs in ({}, {"use_dictionary": False}):
        body = garbled(as_parquet(table, **kwargs))
        err = refused(client, api_key, settings, body, filename="d.parquet", id_column="id")
        assert "Parquet" in err["message"], err


def test_idempotent_replay_of_parquet_and_jsonl_uploads(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """The fingerprint covers every byte however the format was read (Parquet from the file
    itself, sniffed formats peeked first): the same request replays, another format is a 409."""
    parquet = as_parquet(pa.Table.from_pylist(csv_rows()))
    jsonl = as_jsonl(csv_rows())
    for n, (body, name) in enumerate(((parquet, "d.parquet"), (parquet, "blob"), (jsonl, "x"))):
        key = {"Idempotency-Key": f"formats-{n}-{model_name}"}
        first = submit(client, api_key, body, model=model_name, filename=name, headers=key)
        assert first.status_code == 202, first.text
        again = submit(client, api_key, body, model=model_name, filename=name, headers=key)
        assert again.headers.get("Idempotent-Replayed") == "true", again.text
        assert again.json()["id"] == first.json()["id"]
    key = {"Idempotency-Key": f"formats-2-{model_name}"}
    other = submit(client, api_key, jsonl, model=model_name, format="csv", headers=key)
    assert other.status_code == 409, other.text
