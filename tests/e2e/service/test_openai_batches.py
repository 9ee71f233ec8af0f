"""The OpenAI Batch API end to end, with the official ``openai`` package as the client: only
``base_url`` and a docqueue key, a real ``docqueue api`` and the session's tiny vLLM worker.
Client code names ``gpt-4o-mini``; ``DOCQUEUE_MODEL_ALIASES`` maps it to the tiny model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from service.settings import Settings
from tests.support import ROOT
from tests.support.models import VERDICT_SCHEMA
from tests.support.stack import new_key, worker_env

CHAT: Literal["/v1/chat/completions"] = "/v1/chat/completions"


@pytest.fixture(scope="module")
def client(settings: Settings, api_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_server}/v1", api_key=new_key(settings, api_server))


def request(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def upload(client: openai.OpenAI, lines: list[dict[str, Any]] | bytes) -> str:
    raw = (
        lines
        if isinstance(lines, bytes)
        else b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    )
    return client.files.create(file=("requests.jsonl", io.BytesIO(raw)), purpose="batch").id


def wait(
    client: openai.OpenAI, batch_id: str, until: tuple[str, ...], timeout_s: float = 300
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout_s} s"
        time.sleep(0.5)


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_a_batch_runs_to_completed_with_every_request_once(
    client: openai.OpenAI, tiny_worker: Any
) -> None:
    n = 60
    reqs = [request(f"req-{i}", f"Say something about item {i}.", max_tokens=8, temperature=0)
            for i in range(n)]  # fmt: skip
    reqs += [
        request("json-1", "Is water wet?", max_tokens=48, temperature=1.0, seed=3,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA}}),
        request("three", "Pick a word.", max_tokens=4, n=3, temperature=1.0, seed=5),
        request("bad", "x", tools=[{"type": "function"}]),
    ]  # fmt: skip
    batch = client.batches.create(
        input_file_id=upload(client, reqs), endpoint=CHAT, completion_window="24h"
    )
    assert batch.status == "validating"
    done = wait(client, batch.id, ("completed", "failed", "expired", "cancelled"))
    assert done.status == "completed" and done.completed_at and done.finalizing_at
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (n + 3, n + 2)
    assert done.request_counts.failed == 1
    out, errors = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    assert sorted(x["custom_id"] for x in out + errors) == sorted(r["custom_id"] for r in reqs)
    by_id = {x["custom_id"]: x for x in out}
    for line in out:
        assert line["error"] is None and line["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.choices[0].message.role == "assistant"
        assert completion.usage is not None and completion.usage.completion_tokens >= 1
    verdict = json.loads(by_id["json-1"]["response"]["body"]["choices"][0]["message"]["content"])
    assert verdict["answer"] in ("yes", "no") and isinstance(verdict["sure"], bool)
    assert len(by_id["three"]["response"]["body"]["choices"]) == 3
    (bad,) = errors
    assert bad["custom_id"] == "bad" and bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["param"] == "tools"


def test_cancel_mid_run_keeps_what_finished(
    client: openai.OpenAI, api_server: str, tiny_worker: Any
) -> None:
    reqs = [request(f"c-{i}", f"Write a long story number {i}.", max_tokens=64, temperature=0)
            for i in range(3000)]  # fmt: skip
    batch = client.batches.create(
        input_file_id=upload(client, reqs), endpoint=CHAT, completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while (client.batches.retrieve(batch.id).request_counts or _zero()).completed < 10:
        assert time.monotonic() < deadline, "no request finished in 120 s"
        time.sleep(0.3)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    # Beyond OpenAI: the batch is a job, whose partial results the native API serves.
    job_id = (client.batches.retrieve(batch.id).model_extra or {})["job_id"]
    native = httpx.get(
        f"{api_server}/v1/jobs/{job_id}/results?format=jsonl",
        headers={"Authorization": f"Bearer {client.api_key}"},
        timeout=30,
    )
    partial = [json.loads(x) for x in native.text.splitlines()]
    assert len(partial) >= 10 and all(r["id"].startswith("c-") for r in partial)
    done = wait(client, batch.id, ("cancelled",), 180)
    out, errors = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    assert len(out) >= 10 and len(out) + len(errors) == len(reqs)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert sorted(x["custom_id"] for x in out + errors) == sorted(r["custom_id"] for r in reqs)
    with pytest.raises(openai.ConflictError):  # a finished batch: refused, and not retried
        client.batches.cancel(batch.id)


def _zero() -> Any:
    return type("Counts", (), {"completed": 0})()


def test_a_malformed_file_fails_naming_its_lines_and_listing_pages(
    client: openai.OpenAI,
) -> None:
    raw = (
        json.dumps(request("a", "hi")) + "\n{oops\n" + json.dumps(request("a", "again"))
    ).encode()
    failed = client.batches.create(
        input_file_id=upload(client, raw), endpoint=CHAT, completion_window="24h"
    )
    done = wait(client, failed.id, ("failed",), 60)
    assert done.errors is not None and done.errors.data is not None
    assert [(e.line, e.code) for e in done.errors.data] == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
    ]
    page = client.batches.list(limit=1)
    assert len(page.data) == 1 and page.has_more
    after = client.batches.list(limit=1, after=page.data[0].id)
    assert after.data and after.data[0].id != page.data[0].id


def test_greedy_outputs_equal_raw_vllm_chat_byte_for_byte(
    client: openai.OpenAI, settings: Settings, tiny_worker: Any, tiny_model_path: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    texts = [f"Tell me about topic {i}: " + " ".join(["word"] * (i % 9)) for i in range(40)]
    reqs = [request(f"f-{i}", t, max_tokens=16, temperature=0) for i, t in enumerate(texts)]
    batch = client.batches.create(
        input_file_id=upload(client, reqs), endpoint=CHAT, completion_window="24h"
    )
    done = wait(client, batch.id, ("completed",))
    got = {
        x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"]
        for x in lines_of(client, done.output_file_id)
    }
    spec = {"model": tiny_model_path,
            "runs": [{"texts": texts, "max_tokens": 16, "temperature": 0.0}]}  # fmt: skip
    src, dst = tmp_path / "in.json", tmp_path / "out.json"
    src.write_text(json.dumps(spec))
    ran = subprocess.run(
        [sys.executable, "-m", "tests.support.raw_vllm", str(src), str(dst)],
        env=worker_env(settings), capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    (ref,) = json.loads(dst.read_text())
    assert [got[f"f-{i}"] for i in range(len(texts))] == ref["outputs"]
