"""``docqueue run`` as a user runs it: no server (the database and broker URLs point at closed
ports), the tiny model through real vLLM in the same process, stopped with Ctrl-C, then killed
with SIGKILL, and run again; its engine processes must not outlive it, and every row ends in the
output once, the file byte for byte what the service's download gives for the same input."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.support.stack import (
    FAST_RECOVERY,
    docqueue_bin,
    job_results,
    new_key,
    post_job,
    wait_job,
)

pytestmark = pytest.mark.e2e

ROWS = 2000
OPTIONS = ("--task", "generate", "--max-tokens", "12", "--temperature", "0", "--id-column", "id")


def descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(name))
    out, todo = set(), [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def done_rows(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute("SELECT succeeded + failed FROM jobs").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def run_env(tiny_model_path: str) -> dict[str, str]:
    return {
        **os.environ,
        **FAST_RECOVERY,
        "DOCQUEUE_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:9/nothing",
        "DOCQUEUE_REDIS_URL": "redis://127.0.0.1:9/0",
        "DOCQUEUE_DEFAULT_MODEL": tiny_model_path,
        "COLUMNS": "200",
    }


def wait_done(proc: subprocess.Popen[bytes], store: Path, rows: int, log: Path) -> set[int]:
    """Wait until the run has ``rows`` rows done; its engine's processes then."""
    deadline = time.monotonic() + 240
    while done_rows(store) < rows:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the run never reached {rows} rows"
        time.sleep(0.05)
    engine = descendants(proc.pid)
    assert engine, "the engine runs in processes of its own (vLLM's engine core)"
    return engine


def gone(engine: set[int]) -> None:
    deadline = time.monotonic() + 20
    while any(alive(p) for p in engine):
        assert time.monotonic() < deadline, f"engine processes outlived the run: {engine}"
        time.sleep(0.2)


def test_run_survives_ctrl_c_and_sigkill_leaves_no_engine_behind_and_matches_the_service(
    tmp_path: Path, settings: Settings, api_server: str, tiny_worker: Any, tiny_model_path: str
) -> None:
    body = "id,text\n" + "".join(
        f"doc-{i},Report {i}: the team noted item {i % 13} and order {i * 7 % 101}.\n"
        for i in range(1, ROWS + 1)
    )
    src = tmp_path / "in.csv"
    src.write_text(body)
    out = tmp_path / "out.csv"
    store = tmp_path / "out.csv.docqueue.sqlite"
    env = run_env(tiny_model_path)
    argv = [docqueue_bin(), "run", str(src), "-o", str(out), *OPTIONS]

    # Ctrl-C at about 15%, as a terminal sends it: SIGINT to the whole foreground group.
    log1 = tmp_path / "run1.log"
    with log1.open("wb") as fh:
        proc = subprocess.Popen(
            argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            engine = wait_done(proc, store, int(ROWS * 0.15), log1)
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(60) == 130, log1.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert "run the same command to continue" in log1.read_text()
    gone(engine)
    interrupted_at = done_rows(store)
    assert interrupted_at < ROWS and not out.exists()

    # kill -9 at about 40% of the rest: no handler runs, the reaper takes the engine down.
    log2 = tmp_path / "run2.log"
    with log2.open("wb") as fh:
        proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            engine = wait_done(proc, store, interrupted_at + int(ROWS * 0.25), log2)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "continuing the earlier run" in log2.read_text()
    killed_at = done_rows(store)
    assert interrupted_at < killed_at < ROWS, (interrupted_at, killed_at)
    gone(engine)
    assert not out.exists()

    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the earlier run" in again.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["id"] for r in rows] == [f"doc-{i}" for i in range(1, ROWS + 1)]
    assert all(r["error"] == "" and r["output"] for r in rows), "an interrupted row failed"
    with sqlite3.connect(store) as conn:  # each row written once: the kill lost none, redid none
        assert conn.execute("SELECT count(*) FROM results").fetchone()[0] == ROWS
        (attempts,) = conn.execute("SELECT max(attempts) FROM chunks").fetchone()
    assert attempts >= 2, "the chunks in flight at the kill ran again"

    # The same input through the service: the same outputs, greedy.
    key = new_key(settings, api_server)
    job = post_job(
        api_server, key, body, task="generate", model=tiny_model_path, max_tokens=12,
        temperature=0, id_column="id",
    )  # fmt: skip
    assert wait_job(api_server, key, job["id"])["status"] == "completed"
    service = {r["id"]: r["output"] for r in job_results(api_server, key, job["id"])}
    assert {r["id"]: r["output"] for r in rows} == service
    download = httpx.get(
        f"{api_server}/v1/jobs/{job['id']}/results?format=csv",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert download.content == out.read_bytes(), "the file differs from the service's download"

    # Another input or other options are refused, not mixed in; --restart starts over.
    changed = subprocess.run(
        [*argv, "--max-tokens", "4"], env=env, capture_output=True, text=True, timeout=60
    )
    assert changed.returncode == 1 and "--restart" in changed.stderr


def test_an_openai_batch_file_runs_without_a_server_and_the_sdk_parses_its_lines(
    tmp_path: Path, tiny_model_path: str
) -> None:
    from openai.types.chat import ChatCompletion

    src = tmp_path / "requests.jsonl"
    src.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"q{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": f"Name a colour ({i})."}],
                        "max_tokens": 8,
                        "temperature": 0,
                        # n > 1 greedy (vLLM refuses it; OpenAI answers equal choices),
                        # and sampled.
                        **({"n": 2} if i == 2 else {}),
                        **({"n": 3, "temperature": 0.8, "seed": 7} if i == 3 else {}),
                    },
                }
            )
            + "\n"
            for i in range(1, 21)
        )
    )
    out = tmp_path / "out.jsonl"
    env = {**run_env(tiny_model_path), "DOCQUEUE_MODEL_ALIASES": f"gpt-4o-mini={tiny_model_path}"}
    done = subprocess.run(
        [docqueue_bin(), "run", str(src), "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [f"q{i}" for i in range(1, 21)]
    for x in lines:
        assert x["error"] is None and x["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(x["response"]["body"])
        assert completion.model == "gpt-4o-mini" and completion.usage is not None
        assert completion.usage.completion_tokens > 0
    greedy = ChatCompletion.model_validate(lines[1]["response"]["body"]).choices
    assert [c.index for c in greedy] == [0, 1]
    assert greedy[0].message.content == greedy[1].message.content
    single = ChatCompletion.model_validate(lines[0]["response"]["body"])
    assert len(single.choices) == 1
    sampled = ChatCompletion.model_validate(lines[2]["response"]["body"])
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert not (tmp_path / "out.errors.jsonl").exists()


def test_run_on_the_transformers_engine_with_a_1500_row_file(
    tmp_path: Path, tiny_model_path: str
) -> None:
    src = tmp_path / "in.csv"
    src.write_text(
        "id,text\n"
        + "".join(f"r{i},Ticket {i}: the {('api', 'invoice', 'app')[i % 3]} "
                  f"{'is down' if i % 2 else 'looks wrong'} since {i % 24}h\n" for i in range(1500))
    )  # fmt: skip
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in run_env(tiny_model_path).items() if k != "DOCQUEUE_ENGINE"}
    done = subprocess.run(
        [docqueue_bin(), "run", str(src), "-o", str(out), "--engine", "transformers",
         "--task", "summarize", "--max-tokens", "6", "--id-column", "id"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting the transformers engine" in done.stderr
    assert "completed: 1500 rows" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(1500)]
    assert all(r["error"] is None and r["output"] and r["completion_tokens"] == 6 for r in rows)
