"""Results files written in-process (``docqueue run``): the download's columns and rules."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from service.jobs.export import PARQUET_COLUMNS, result_record, write_file


def result(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "output": "fine",
        "label": None,
        "confidence": None,
        "finish_reason": "stop",
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "truncated": 0,
        "error": None,
    }
    return {**base, **over}


RECORDS = [
    result_record("a", 1, result(output='=cmd|"/c calc"!A1, "quoted"\nnext line')),
    result_record(None, 2, result(output="", label="pos", confidence=0.875, truncated=1)),
    result_record(
        "c", 3, result(output=None, finish_reason=None, error="-no label", completion_tokens=0)
    ),
]


def test_csv_has_the_download_columns_and_neutralises_formulas(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    assert write_file(iter(RECORDS), "csv", path) == 3
    rows = list(csv.reader(path.open(newline="")))
    assert rows[0] == [name for name, _ in PARQUET_COLUMNS]
    assert rows[1][:2] == ["a", '\'=cmd|"/c calc"!A1, "quoted"\nnext line']
    assert rows[2] == ["2", "", "pos", "0.875", "stop", "7", "3", "true", ""]
    assert rows[3][-1] == "'-no label" and rows[3][1] == ""
    assert not list(tmp_path.glob(".*partial"))


def test_jsonl_and_parquet_keep_types_and_nulls(tmp_path: Path) -> None:
    write_file(iter(RECORDS), "jsonl", tmp_path / "out.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert lines[1] == {
        "id": "2", "output": "", "label": "pos", "confidence": 0.875, "finish_reason": "stop",
        "prompt_tokens": 7, "completion_tokens": 3, "truncated": True, "error": None,
    }  # fmt: skip
    assert lines[2]["output"] is None and lines[0]["output"].startswith("=cmd")  # not a sheet
    write_file(iter(RECORDS), "parquet", tmp_path / "out.parquet")
    table = pq.read_table(tmp_path / "out.parquet")
    assert [(f.name, str(f.type)) for f in table.schema] == [
        (n, {"float64": "double"}.get(t, t)) for n, t in PARQUET_COLUMNS
    ]
    assert table.to_pylist() == lines


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_failed_write_leaves_no_file(tmp_path: Path, fmt: str) -> None:
    def broken() -> Any:
        yield RECORDS[0]
        raise OSError("disk full")

    path = tmp_path / f"out.{fmt}"
    with pytest.raises(OSError, match="disk full"):
        write_file(broken(), fmt, path)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
