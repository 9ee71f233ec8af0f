"""Ingest through POST /v1/jobs: what lands in Postgres, row for row."""

from __future__ import annotations

import math

from fastapi.testclient import TestClient

from service.settings import Settings
from tests.support.helpers import count_rows, documents, submit


def test_rows_order_unicode_multiline_and_extra_columns(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    csv_text = (
        "id,text,lang,source\n"
        'a1,"Hello, world",en,web\n'
        'a2,"line one\nline two\r\nline three",en,mail\n'
        "a3,Grüße aus Köln — 東京 🚀,de,web\n"
        'a4,"She said ""hi""",en,\n'
    )
    resp = submit(client, api_key, csv_text, id_column="id", model=model_name)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["status"] == "queued"
    assert job["counts"] == {"total": 4, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert job["params"]["extra_columns"] == ["lang", "source"]
    rows = documents(settings.database.url, job["id"])
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert [r[1] for r in rows] == ["a1", "a2", "a3", "a4"]
    assert rows[0][2] == "Hello, world"
    assert rows[1][2] == "line one\nline two\r\nline three"
    assert rows[2][2] == "Grüße aus Köln — 東京 🚀"
    assert rows[3][2] == 'She said "hi"'
    assert rows[0][3] == {"lang": "en", "source": "web"}
    assert rows[3][3] == {"lang": "en", "source": ""}


def test_bom_semicolon_and_row_numbers_as_default_ids(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    # The sniffer must pick ';': the header splits into two columns on it.
    body = "\ufefftitle;text\nT1;alpha\nT2;beta\n".encode()
    resp = submit(client, api_key, body, model=model_name)
    assert resp.status_code == 202, resp.text
    rows = documents(settings.database.url, resp.json()["id"])
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (1, None, "alpha", {"title": "T1"}),
        (2, None, "beta", {"title": "T2"}),
    ]


def test_tab_delimiter_given_and_sniffed(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    body = "text\tscore\nsome, text, with commas\t1\nmore\t2\n"
    for delimiter in (None, "tab"):
        resp = submit(client, api_key, body, model=model_name, delimiter=delimiter)
        assert resp.status_code == 202, resp.text
        rows = documents(settings.database.url, resp.json()["id"])
        assert [r[2] for r in rows] == ["some, text, with commas", "more"]
        assert rows[0][3] == {"score": "1"}


def test_nul_bytes_are_stripped(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    body = b"text,note\nab\x00cd,n\x00ote\n"
    resp = submit(client, api_key, body, model=model_name)
    assert resp.status_code == 202, resp.text
    rows = documents(settings.database.url, resp.json()["id"])
    assert rows[0][2] == "abcd"
    assert rows[0][3] == {"note": "note"}


def test_backslashes_and_tabs_survive_copy(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    text = 'C:\\path\\n not a newline\\t, "tab:\there", \\\\N'
    body = "text\n" + '"' + text.replace('"', '""') + '"\n' + "\\N\n"
    resp = submit(client, api_key, body, model=model_name, delimiter=",")
    assert resp.status_code == 202, resp.text
    rows = documents(settings.database.url, resp.json()["id"])
    assert rows[0][2] == text
    assert rows[1][2] == "\\N"  # a literal \N is text, not NULL


def test_custom_text_column_and_blank_lines(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    body = "body,extra\nfirst,x\n\nsecond,\n"
    resp = submit(client, api_key, body, model=model_name, text_column="body")
    assert resp.status_code == 202, resp.text
    rows = documents(settings.database.url, resp.json()["id"])
    assert [(r[0], r[2], r[3]) for r in rows] == [
        (1, "first", {"extra": "x"}),
        (2, "second", {"extra": ""}),
    ]


def test_a_short_row_is_refused_not_padded(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """A row missing fields is usually a broken file (or a wrong delimiter): padding it hid
    that, and let a file of empty lines store every column name in every row."""
    body = "body,extra\nfirst,x\n\nsecond\n"
    resp = submit(client, api_key, body, model=model_name, text_column="body")
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert (err["row"], err["line"]) == (2, 4)
    assert "1 fields, but the header has 2" in err["message"]
    assert "delimiter ','" in err["message"]


def test_chunks_cover_every_document_once(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    n, size = 1000, 64
    body = "text\n" + "".join(f"doc {i}\n" for i in range(n))
    resp = submit(client, api_key, body, model=model_name, chunk_size=size)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["chunks"] == math.ceil(n / size)
    from tests.support.helpers import pg, wait_enqueued

    # No worker serves the model: the dispatcher releases `ahead` chunks, the rest wait.
    wait_enqueued(settings, job["id"], settings.dispatch.ahead)
    with pg(settings.database.url) as conn:
        ranges = conn.execute(
            "SELECT seq, start_idx, end_idx, state, enqueued_at IS NOT NULL FROM chunks "
            "WHERE job_id = %s ORDER BY seq",
            (job["id"],),
        ).fetchall()
    covered = [i for _, start, end, _, _ in ranges for i in range(start, end)]
    assert covered == list(range(1, n + 1))
    assert [r[0] for r in ranges] == list(range(len(ranges)))
    assert {r[3] for r in ranges} == {"queued"}
    assert [r[4] for r in ranges] == [r[0] < settings.dispatch.ahead for r in ranges]
    assert count_rows(settings.database.url, "documents", job["id"]) == n


def test_template_fields_may_use_columns(client: TestClient, api_key: str, model_name: str) -> None:
    body = "text,lang\nhello,en\n"
    resp = submit(
        client,
        api_key,
        body,
        model=model_name,
        task="generate",
        prompt="Translate from {lang}: {text}",
    )
    assert resp.status_code == 202, resp.text
    assert resp.json()["params"]["prompt"] == "Translate from {lang}: {text}"
