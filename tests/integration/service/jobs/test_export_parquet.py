"""GET /v1/jobs/{id}/results?format=parquet: typed columns, read back with pyarrow; a row group
per page, streamed."""

from __future__ import annotations

import io
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.integration.service.jobs.test_export import FIELDS, _job_with_results, _small_pages
from tests.support.helpers import auth, pg, submit


def _parquet(client: TestClient, key: str, job_id: str) -> pa.Table:
    resp = client.get(f"/v1/jobs/{job_id}/results?format=parquet", headers=auth(key))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/vnd.apache.parquet"
    assert resp.headers["content-disposition"].endswith(f'{job_id}.parquet"')
    return pq.read_table(io.BytesIO(resp.content))


def test_parquet_has_typed_columns_and_exact_values(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = _job_with_results(client, api_key, settings, model_name)
    table = _parquet(client, api_key, job_id)
    assert table.column_names == FIELDS
    types = {f.name: f.type for f in table.schema}
    assert types["prompt_tokens"] == pa.int64() and types["completion_tokens"] == pa.int64()
    assert types["confidence"] == pa.float64() and types["truncated"] == pa.bool_()
    assert types["output"] == pa.string()
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["=1+1", "plain", "p3", "p4"]
    assert rows[0]["output"] == '=HYPERLINK("http://evil")'  # no spreadsheet guard here
    assert rows[0]["truncated"] is True and rows[1]["truncated"] is False
    assert rows[1]["output"] == 'line 1\nline 2, "quoted"'
    assert rows[2] == {
        "id": "p3",
        "output": "Zürich — 東京",
        "label": "pos",
        "confidence": 0.75,
        "finish_reason": "stop",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "truncated": False,
        "error": None,
    }
    assert rows[3]["output"] is None and rows[3]["error"] == "-empty text"
    assert rows[3]["finish_reason"] is None and rows[3]["completion_tokens"] == 0
    assert rows[0]["label"] is None and rows[0]["confidence"] is None


def test_parquet_empty_string_is_not_null_and_no_results_is_a_valid_file(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\nb\n", model=model_name).json()["id"]
    empty = _parquet(client, api_key, job_id)
    assert empty.num_rows == 0 and empty.column_names == FIELDS
    with pg(settings.database.url) as conn:
        conn.execute(
            "INSERT INTO results (job_id, idx, output, label) VALUES (%s, 1, '', 'NULL')",
            (uuid.UUID(job_id),),
        )
    rows = _parquet(client, api_key, job_id).to_pylist()
    assert [(r["id"], r["output"], r["label"], r["error"]) for r in rows] == [
        ("1", "", "NULL", None)
    ]


def test_parquet_pages_are_row_groups_in_order_and_once(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _small_pages(monkeypatch)
    n = 3000
    body = "text\n" + "".join(f"d{i}\n" for i in range(n))
    job_id = submit(client, api_key, body, model=model_name).json()["id"]
    long = "=x\n" + 'say "hi", ' * 200
    with pg(settings.database.url) as conn:
        conn.execute(
            "INSERT INTO results (job_id, idx, output, prompt_tokens) SELECT job_id, idx, "
            "CASE WHEN idx <= 1000 THEN 'o' || idx ELSE idx || %s END, idx FROM documents "
            "WHERE job_id = %s AND (idx <= 1000 OR idx > 2000)",
            (long, uuid.UUID(job_id)),
        )
    resp = client.get(f"/v1/jobs/{job_id}/results?format=parquet", headers=auth(api_key))
    meta = pq.read_metadata(io.BytesIO(resp.content))
    assert meta.num_row_groups > 10  # a row group per page, not one whole table
    table = pq.read_table(io.BytesIO(resp.content))
    expected = [(str(i), f"o{i}", i) for i in range(1, 1001)] + [
        (str(i), f"{i}{long}", i) for i in range(2001, n + 1)
    ]
    got = zip(
        table.column("id").to_pylist(),
        table.column("output").to_pylist(),
        table.column("prompt_tokens").to_pylist(),
        strict=True,
    )
    assert list(got) == expected
