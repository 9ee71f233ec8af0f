"""GET /v1/jobs/{id}/results: input order, both formats, formula neutralisation, partial."""

from __future__ import annotations

import csv
import io
import json
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.errors import ResultsExpiredError
from service.jobs import export
from service.settings import Settings
from service.store.engine import get_engine
from tests.support.helpers import auth, pg, submit

# The result fields and their order, as the API promises them (written out, not imported).
FIELDS = [
    "id", "output", "label", "confidence", "finish_reason", "prompt_tokens",
    "completion_tokens", "truncated", "error",
]  # fmt: skip


def _write_results(url: str, job_id: str, rows: list[dict[str, Any]]) -> None:
    """Stands in for the worker (next issue), writing result rows as it will."""
    with pg(url) as conn:
        for r in rows:
            conn.execute(
                "INSERT INTO results (job_id, idx, output, label, confidence, finish_reason, "
                "prompt_tokens, completion_tokens, truncated, error) VALUES "
                "(%(job)s, %(idx)s, %(output)s, %(label)s, %(confidence)s, %(finish_reason)s, "
                "%(prompt_tokens)s, %(completion_tokens)s, %(truncated)s, %(error)s)",
                {
                    "job": uuid.UUID(job_id),
                    "label": None,
                    "confidence": None,
                    "finish_reason": "stop",
                    "prompt_tokens": 10,
                    "completion_tokens": 5,
                    "truncated": False,
                    "error": None,
                    **r,
                },
            )


def _job_with_results(client: TestClient, key: str, settings: Settings, model: str) -> str:
    body = (
        "id,text\n"
        "=1+1,formula id\n"
        "plain,multi-line output\n"
        "p3,unicode\n"
        "p4,failed row\n"
        "p5,not done yet\n"
    )
    job_id: str = submit(client, key, body, model=model, id_column="id").json()["id"]
    _write_results(
        settings.database.url,
        job_id,
        # Written out of order on purpose: the export must sort by input order.
        [
            {"idx": 3, "output": "Zürich — 東京", "label": "pos", "confidence": 0.75},
            {"idx": 1, "output": '=HYPERLINK("http://evil")', "truncated": True},
            {"idx": 2, "output": 'line 1\nline 2, "quoted"'},
            {
                "idx": 4,
                "output": None,
                "error": "-empty text",
                "completion_tokens": 0,
                "finish_reason": None,
            },
        ],
    )
    return job_id


def test_csv_in_input_order_with_formulas_neutralised(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = _job_with_results(client, api_key, settings, model_name)
    resp = client.get(f"/v1/jobs/{job_id}/results?format=csv", headers=auth(api_key))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/csv")
    assert f'filename="{job_id}.csv"' in resp.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(resp.text)))
    assert list(rows[0]) == FIELDS
    assert [r["id"] for r in rows] == ["'=1+1", "plain", "p3", "p4"]  # p5 is not done
    assert rows[0]["output"] == '\'=HYPERLINK("http://evil")'
    assert rows[0]["truncated"] == "true"
    assert rows[1]["output"] == 'line 1\nline 2, "quoted"'
    assert rows[1]["truncated"] == "false"
    assert rows[2] == {
        "id": "p3",
        "output": "Zürich — 東京",
        "label": "pos",
        "confidence": "0.75",
        "finish_reason": "stop",
        "prompt_tokens": "10",
        "completion_tokens": "5",
        "truncated": "false",
        "error": "",
    }
    assert rows[3]["error"] == "'-empty text"
    assert rows[3]["output"] == ""


def test_jsonl_keeps_values_exact(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    job_id = _job_with_results(client, api_key, settings, model_name)
    resp = client.get(f"/v1/jobs/{job_id}/results?format=jsonl", headers=auth(api_key))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    lines = resp.text.splitlines()
    objs = [json.loads(line) for line in lines]
    assert [o["id"] for o in objs] == ["=1+1", "plain", "p3", "p4"]
    assert objs[0]["output"] == '=HYPERLINK("http://evil")'  # no CSV quoting in JSON
    assert objs[0]["truncated"] is True
    assert objs[1]["output"] == 'line 1\nline 2, "quoted"'
    assert objs[2]["confidence"] == 0.75 and objs[2]["label"] == "pos"
    assert objs[3]["output"] is None and objs[3]["error"] == "-empty text"
    assert list(objs[0]) == FIELDS


def test_default_ids_are_row_numbers_and_large_exports_stream(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    n = 5000
    body = "text\n" + "".join(f"document {i}\n" for i in range(n))
    job_id = submit(client, api_key, body, model=model_name).json()["id"]
    with pg(settings.database.url) as conn:
        conn.execute(
            "INSERT INTO results (job_id, idx, output) "
            "SELECT job_id, idx, 'summary of ' || text || repeat('.', 100) FROM documents "
            "WHERE job_id = %s",
            (uuid.UUID(job_id),),
        )
    chunks = []
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/results?format=jsonl", headers=auth(api_key)
    ) as resp:
        for piece in resp.iter_bytes():
            chunks.append(piece)
    objs = [json.loads(line) for line in b"".join(chunks).splitlines()]
    assert [o["id"] for o in objs] == [str(i) for i in range(1, n + 1)]
    assert objs[-1]["output"].startswith(f"summary of document {n - 1}.")


def test_empty_results_while_queued_and_bad_format(
    client: TestClient, api_key: str, model_name: str
) -> None:
    job_id = submit(client, api_key, "text\na\n", model=model_name).json()["id"]
    resp = client.get(f"/v1/jobs/{job_id}/results", headers=auth(api_key))
    assert resp.status_code == 200
    assert resp.headers["x-job-status"] == "queued"
    assert resp.text.splitlines() == [
        "id,output,label,confidence,finish_reason,prompt_tokens,completion_tokens,truncated,error"
    ]
    assert client.get(f"/v1/jobs/{job_id}/results?format=jsonl", headers=auth(api_key)).text == ""
    bad = client.get(f"/v1/jobs/{job_id}/results?format=xml", headers=auth(api_key))
    assert bad.status_code == 422 and "format" in bad.json()["error"]["message"]


def test_csv_guard_covers_leading_tab_and_carriage_return(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """Some spreadsheets skip a leading tab or CR and then read a formula (OWASP CSV
    injection): those cells get the quote too, in every text column; JSONL stays exact."""
    body = "id,text\n@x,a\nplain,b\n"  # ids are stripped at upload: no tab can lead one
    job_id: str = submit(client, api_key, body, model=model_name, id_column="id").json()["id"]
    _write_results(
        settings.database.url,
        job_id,
        [
            {"idx": 1, "output": "\t=cmd|' /C calc'!A0", "label": "\rx", "error": "\t-1"},
            {"idx": 2, "output": '\r=HYPERLINK("http://evil")', "label": "tab\tinside"},
        ],
    )
    resp = client.get(f"/v1/jobs/{job_id}/results?format=csv", headers=auth(api_key))
    rows = list(csv.DictReader(io.StringIO(resp.text, newline="")))
    assert [(r["id"], r["output"], r["label"], r["error"]) for r in rows] == [
        ("'@x", "'\t=cmd|' /C calc'!A0", "'\rx", "'\t-1"),
        ("plain", '\'\r=HYPERLINK("http://evil")', "tab\tinside", ""),
    ]
    resp = client.get(f"/v1/jobs/{job_id}/results?format=jsonl", headers=auth(api_key))
    objs = [json.loads(line) for line in resp.text.splitlines()]
    assert [o["output"] for o in objs] == ["\t=cmd|' /C calc'!A0", '\r=HYPERLINK("http://evil")']


def _small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages of a few KiB instead of MiB, so a small job crosses many page boundaries, a run of
    unfinished rows and a page too big to keep (read again in a shorter range)."""
    monkeypatch.setattr(export, "_FLUSH_BYTES", 1024)
    monkeypatch.setattr(export, "_PAGE_BYTES", 8 * 1024)
    monkeypatch.setattr(export, "_MAX_BUFFER_BYTES", 32 * 1024)
    monkeypatch.setattr(export, "_FIRST_PAGE_ROWS", 7)


def test_paged_export_is_whole_in_order_and_once(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Short rows, then a stretch not done yet, then rows 200 times longer (with newlines,
    quotes and formulas): every done row comes once, in input order, the CSV header once."""
    _small_pages(monkeypatch)
    n = 3000
    body = "text\n" + "".join(f"d{i}\n" for i in range(n))
    job_id = submit(client, api_key, body, model=model_name).json()["id"]
    long = "=x\n" + 'say "hi", ' * 200
    with pg(settings.database.url) as conn:
        conn.execute(
            "INSERT INTO results (job_id, idx, output) SELECT job_id, idx, "
            "CASE WHEN idx <= 1000 THEN 'o' || idx ELSE idx || %s END FROM documents "
            "WHERE job_id = %s AND (idx <= 1000 OR idx > 2000)",
            (long, uuid.UUID(job_id)),
        )
    expected = [(str(i), f"o{i}") for i in range(1, 1001)] + [
        (str(i), f"{i}{long}") for i in range(2001, n + 1)
    ]
    resp = client.get(f"/v1/jobs/{job_id}/results?format=csv", headers=auth(api_key))
    assert resp.text.count("id,output,label") == 1
    rows = list(csv.DictReader(io.StringIO(resp.text, newline="")))
    assert [(r["id"], r["output"]) for r in rows] == expected
    resp = client.get(f"/v1/jobs/{job_id}/results?format=jsonl", headers=auth(api_key))
    objs = [json.loads(line) for line in resp.text.splitlines()]
    assert [(o["id"], o["output"]) for o in objs] == expected


def test_purge_during_download_aborts_it(
    client: TestClient,
    api_key: str,
    settings: Settings,
    model_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retention marks the job, then deletes its rows page by page behind the download's back:
    the download must break, not end as a shorter file that looks complete."""
    _small_pages(monkeypatch)
    body = "text\n" + "".join(f"d{i}\n" for i in range(500))
    job_id = submit(client, api_key, body, model=model_name).json()["id"]
    with pg(settings.database.url) as conn:
        conn.execute(
            "INSERT INTO results (job_id, idx, output) SELECT job_id, idx, repeat('y', 100) "
            "FROM documents WHERE job_id = %s",
            (uuid.UUID(job_id),),
        )
    pieces = export.stream_results(get_engine(settings.database.url), uuid.UUID(job_id), "csv")
    next(pieces)
    with pg(settings.database.url) as conn:
        conn.execute("UPDATE jobs SET results_expired_at = now() WHERE id = %s", (job_id,))
        conn.execute("DELETE FROM results WHERE job_id = %s AND idx > 250", (job_id,))
    with pytest.raises(ResultsExpiredError):
        list(pieces)
