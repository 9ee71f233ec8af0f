"""The CLI against a real `docqueue api` process (uploads parsed in its pool processes): JSON
Lines and Parquet files submitted as they are, results downloaded as Parquet."""

from __future__ import annotations

import io
import json
import subprocess
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from service.settings import Settings
from tests.support.helpers import documents, pg
from tests.support.stack import cli, cli_env, docqueue_bin, new_key

ROWS = [
    {"id": "r1", "text": "great product", "stars": 5},
    {"id": "r2", "text": "awful,\nreally", "stars": 1},
    {"id": "r3", "text": "fine", "stars": 3},
]


def _submit(env: dict[str, str], path: Path, model: str, *extra: str) -> str:
    done = cli(
        "submit", str(path), "--task", "summarize", "--model", model, "--id-column", "id",
        "--json", *extra, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["counts"]["total"] == 3
    return str(job["id"])


def test_submit_jsonl_and_parquet_download_parquet(
    settings: Settings, api_server: str, tmp_path: Path, model_name: str
) -> None:
    env = cli_env(settings, api_server, new_key(settings, api_server))
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    parquet = tmp_path / "reviews.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet, row_group_size=2)
    # A name that says nothing, and --format: Parquet through the pool process's own file.
    renamed = tmp_path / "reviews.bin"
    renamed.write_bytes(parquet.read_bytes())
    jobs = [
        _submit(env, jsonl, model_name),
        _submit(env, parquet, model_name),
        _submit(env, renamed, model_name, "--format", "parquet"),
    ]
    expected = [
        (1, "r1", "great product", {"stars": "5"}),
        (2, "r2", "awful,\nreally", {"stars": "1"}),
        (3, "r3", "fine", {"stars": "3"}),
    ]
    for job_id in jobs:
        assert documents(settings.database.url, job_id) == expected

    with pg(settings.database.url) as conn:
        conn.execute(
            "INSERT INTO results (job_id, idx, output, completion_tokens, truncated) "
            "SELECT job_id, idx, upper(text), idx * 2, idx = 2 FROM documents WHERE job_id = %s",
            (uuid.UUID(jobs[1]),),
        )
    out = tmp_path / "out.parquet"
    got = cli("results", jobs[1], "-o", str(out), env=env)
    assert got.returncode == 0, got.stderr
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == ["r1", "r2", "r3"]
    assert table.column("completion_tokens").to_pylist() == [2, 4, 6]
    assert table.column("truncated").to_pylist() == [False, True, False]
    # --format parquet to a pipe: the same bytes.
    piped = subprocess.run(
        [docqueue_bin(), "results", jobs[1], "--format", "parquet"],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert pq.read_table(io.BytesIO(piped.stdout)).equals(table)
