"""Hostile uploads through POST /v1/jobs, as an attacker or a broken exporter would send them.

Each one is refused with a 400 that says what and where, cheaply and before anything is
stored, or is stored within a small constant factor of its size: never a 500, never a silent
merge or split of rows, never a job with fewer rows than the file.
"""

from __future__ import annotations

import random
import string
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.support.helpers import documents, pg, submit, tenant_totals

# What the store may hold for one upload: 4x its bytes, plus per row 64 bytes of JSON
# punctuation the ingest allows and about 64 of PostgreSQL's own (tuple header, job id, idx),
# plus 64 KiB per file.
FACTOR, PER_ROW, SLACK = 4, 128, 64 * 1024


def stored_bytes(settings: Settings, job_id: str) -> tuple[int, int]:
    """(rows, bytes) PostgreSQL stores for the job's documents."""
    with pg(settings.database.url) as conn:
        row = conn.execute(
            "SELECT count(*), coalesce(sum(pg_column_size(d.*)), 0) FROM documents d "
            "WHERE job_id = %s",
            (uuid.UUID(job_id),),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def refused(
    client: TestClient, api_key: str, settings: Settings, body: bytes | str, **fields: Any
) -> dict[str, Any]:
    """Submits ``body``, expects a 400 and that nothing of it was stored; the error."""
    before = tenant_totals(settings.database.url, api_key)
    resp = submit(client, api_key, body, **fields)
    assert resp.status_code == 400, resp.text[:2000]
    assert len(resp.content) < 4096
    assert tenant_totals(settings.database.url, api_key) == before
    return dict(resp.json()["error"])


def _name(i: int, length: int) -> str:
    return f"c{i:04d}_".ljust(length, "x")


def bomb_shapes(settings: Settings) -> dict[str, str]:
    """Uploads built to make the store hold far more than they weigh."""
    cols = settings.jobs.max_columns - 1  # besides text
    rng = random.Random(11)

    def words(n: int) -> str:
        return "".join(rng.choices(string.ascii_letters, k=n))

    # The shape of the reported bomb: many columns, rows of one short field, padded.
    many = ",".join(_name(i, 6) for i in range(2000))
    # Within the column cap, names as long as the per-row cap allows, rows only delimiters.
    name_len = settings.jobs.max_extra_bytes // cols - 8
    long_names = ",".join(_name(i, name_len) for i in range(cols))
    # Names paid for by long texts: as much amplification as the ingest lets through.
    paid = ",".join(_name(i, 40) for i in range(200))
    return {
        "many_columns_short_rows": f"text,{many}\n" + "a\n" * 2000,
        "long_names_empty_rows": f"text,{long_names}\n" + ("a" + "," * cols + "\n") * 200,
        "long_names_paid_by_text": f"text,{paid}\n"
        + "".join(words(3200) + "," * 200 + "\n" for _ in range(300)),
        "tiny_rows": "text,c\n" + "a,\n" * 20000,
    }


@pytest.mark.parametrize(
    "shape",
    ["many_columns_short_rows", "long_names_empty_rows", "long_names_paid_by_text", "tiny_rows"],
)
def test_stored_size_stays_within_a_small_factor_of_the_upload(
    client: TestClient, api_key: str, settings: Settings, model_name: str, shape: str
) -> None:
    """A 61 KB upload once became a 129 MB COPY: a few MB could fill the disk every tenant
    shares. Whatever the shape, the store holds at most 4x the upload plus a per-row cost."""
    body = bomb_shapes(settings)[shape].encode()
    resp = submit(client, api_key, body, model=model_name)
    if resp.status_code == 202:
        rows, size = stored_bytes(settings, resp.json()["id"])
        assert rows == resp.json()["counts"]["total"] > 0
        assert size <= FACTOR * len(body) + PER_ROW * rows + SLACK, (size, len(body), rows)
    else:
        assert resp.status_code == 400, resp.text[:2000]
        assert len(resp.content) < 4096
    # The bombs themselves are refused; the shapes that pay for what they store are not.
    expected = {"long_names_paid_by_text": 202, "tiny_rows": 202}.get(shape, 400)
    assert resp.status_code == expected, resp.text[:2000]


def test_the_repeated_names_bomb_names_the_row_and_the_cure(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    body = bomb_shapes(settings)["long_names_empty_rows"]
    err = refused(client, api_key, settings, body, model=model_name)
    assert err["row"] >= 1 and err["line"] == err["row"] + 1
    assert "4 times the file" in err["message"] and "shorten their names" in err["message"]


def test_more_columns_than_the_cap_is_a_400(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    n = settings.jobs.max_columns + 44
    header = "text," + ",".join(f"c{i}" for i in range(n - 1))
    err = refused(
        client, api_key, settings, header + "\nx" + "," * (n - 1) + "\n", model=model_name
    )
    assert err["line"] == 1
    assert f"the header has {n} columns" in err["message"]


def test_a_row_whose_other_columns_pass_the_cap_is_a_400(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    cap = settings.jobs.max_extra_bytes
    body = "id,text,note\n1,small,ok\n2,also small," + "n" * (cap + 1) + "\n3,x,y\n"
    err = refused(client, api_key, settings, body, model=model_name)
    assert (err["row"], err["line"]) == (2, 3)
    assert f"the limit is {cap} bytes per row" in err["message"]


def test_a_17_mb_header_line_is_a_small_400(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """It once cost +363 MB of memory and answered with a 23 MB error body."""
    header = ",".join(f"column_{i:07d}" for i in range(1_200_000))
    assert len(header) > 17_000_000
    err = refused(client, api_key, settings, f"{header}\nx\n", model=model_name)
    assert err["line"] == 1 and "longer than" in err["message"]


def test_a_header_field_over_1_mib_is_a_400_not_a_500(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    body = "text," + "h" * (1024 * 1024 + 1) + "\nx,y\n"
    err = refused(client, api_key, settings, body, model=model_name)
    assert err["line"] == 1 and "column name" in err["message"]


def test_a_line_longer_than_any_row_is_a_400(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """Fields each under the document limit, a line over what any row can store."""
    field = "f" * (settings.jobs.max_document_bytes - 1)
    body = f"text,a,b,c\nshort,{field},{field},{field}\n"
    err = refused(client, api_key, settings, body, model=model_name)
    assert (err["row"], err["line"]) == (1, 2)
    assert "line 2 is longer than" in err["message"]


def test_a_quote_that_never_closes_is_a_400_naming_its_line(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """It used to swallow every later row into one field, and the job had fewer rows."""
    body = 'id,text\n1,fine\n2,fine\n3,"forgot to close\n4,swallowed\n5,swallowed\n'
    err = refused(client, api_key, settings, body, model=model_name)
    assert (err["row"], err["line"]) == (3, 4)
    assert "opened on line 4 is never closed" in err["message"]
    # Closed much later by another row's quote: the same row and line, not a merged row.
    body = 'id,text\n1,"forgot to close\n2,two\n3,"quoted" after\n'
    err = refused(client, api_key, settings, body, model=model_name)
    assert (err["row"], err["line"]) == (1, 2)
    assert "opened on line 2" in err["message"]


def test_text_after_a_closing_quote_is_a_400_not_a_merged_field(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """``"abc"def`` used to become ``abcdef`` without a word."""
    err = refused(client, api_key, settings, 'id,text\n1,ok\n2,"abc"def\n', model=model_name)
    assert (err["row"], err["line"]) == (2, 3)


def test_a_quote_inside_an_unquoted_field_is_kept(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """As Excel and lenient RFC 4180 readers do: a 5" screen is a 5" screen."""
    resp = submit(client, api_key, 'id,text\n1,a 5" screen\n2,x\n', model=model_name)
    assert resp.status_code == 202, resp.text
    rows = documents(settings.database.url, resp.json()["id"])
    assert [r[2] for r in rows] == ['a 5" screen', "x"]


def test_mixed_line_endings_keep_rows_and_a_stray_cr_is_a_400(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    resp = submit(client, api_key, 'text\r\none\ntwo\r\n"three\rlines\nhere"\r\n', model=model_name)
    assert resp.status_code == 202, resp.text
    rows = documents(settings.database.url, resp.json()["id"])
    assert [r[2] for r in rows] == ["one", "two", "three\rlines\nhere"]
    # A lone \r in an unquoted field used to split its document in two.
    err = refused(client, api_key, settings, "text\none\ntwo\rhalves\nfour\n", model=model_name)
    assert (err["row"], err["line"]) == (2, 3)
    assert "line break (\\r)" in err["message"]


def test_rows_that_do_not_fit_the_sniffed_delimiter_are_a_400_with_the_cure(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    """Concatenated exports: comma rows for the sniffed sample, semicolon rows after it. They
    used to be padded and stored as garbage."""
    body = "id,text\n" + "".join(f"{i},some words here\n" for i in range(1, 2001))
    body += "2001;other;export\n"
    err = refused(client, api_key, settings, body, model=model_name)
    assert (err["row"], err["line"]) == (2001, 2002)
    assert "1 fields, but the header has 2" in err["message"]
    assert "read with delimiter ','" in err["message"]
    assert "set the delimiter field" in err["message"]


def test_errors_echo_a_bounded_list_of_column_names(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    names = [_name(i, 200) for i in range(settings.jobs.max_columns)]
    body = ",".join(names) + "\n" + "," * (len(names) - 1) + "\n"
    err = refused(client, api_key, settings, body, model=model_name)
    assert "text column 'text' not found" in err["message"]
    assert f"({len(names) - 20} more)" in err["message"]
