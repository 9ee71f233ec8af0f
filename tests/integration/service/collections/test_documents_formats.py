"""Collection uploads in JSON Lines and Parquet: the same upsert as the CSV they came from."""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.support.helpers import auth, pg, put

ROWS = [{"id": "a", "text": "Alpha", "lang": "en"}, {"id": "b", "text": "Beta", "lang": "de"}]


def put_file(client: TestClient, key: str, name: str, body: bytes, filename: str) -> Any:
    return client.put(
        f"/v1/collections/{name}/documents",
        headers=auth(key),
        files={"file": (filename, body, "application/octet-stream")},
    )


def stored(settings: Settings, name: str) -> list[tuple[Any, ...]]:
    with pg(settings.database.url) as conn:
        return conn.execute(
            "SELECT d.external_id, d.text, d.extra FROM collection_documents d "
            "JOIN collections c ON c.id = d.collection_id WHERE c.name = %s "
            "ORDER BY d.external_id",
            (name,),
        ).fetchall()


def test_jsonl_and_parquet_upsert_like_csv(
    client: TestClient, api_key: str, settings: Settings
) -> None:
    assert put(client, api_key, "c-csv", "id,text,lang\na,Alpha,en\nb,Beta,de\n").status_code == 200
    jsonl = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ROWS), buf)
    for name, body, filename in (("c-jsonl", jsonl, "n.jsonl"), ("c-pq", buf.getvalue(), "n")):
        resp = put_file(client, api_key, name, body, filename)
        assert resp.status_code == 200, resp.text
        assert resp.json()["upserted"] == {"inserted": 2, "updated": 0, "unchanged": 0}
        assert stored(settings, name) == stored(settings, "c-csv")
    bad = put_file(client, api_key, "c-bad", b'{"id": "a", "text": 5}\n', "n.jsonl")
    assert bad.status_code == 400 and "line 1 (row 1)" in bad.json()["error"]["message"]
