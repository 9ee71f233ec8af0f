"""The chunk messages in Redis: one per chunk, on the model's queue, carrying ids only."""

from __future__ import annotations

import base64
import json
import time
import uuid

import redis
from fastapi.testclient import TestClient

from service.contract import TASK_RUN_CHUNK, queue_for_model
from service.settings import Settings
from tests.support.helpers import override, pg, submit, wait_enqueued


def _messages(client: redis.Redis, queue: str) -> list[dict]:
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def test_one_message_per_chunk_with_the_chunk_id_only(
    client: TestClient,
    api_key: str,
    settings: Settings,
    redis_client: redis.Redis,
    model_name: str,
) -> None:
    secret = "CONFIDENTIAL-PAYLOAD-" + uuid.uuid4().hex
    body = "id,text\n" + "".join(f"d{i},{secret} number {i}\n" for i in range(10))
    job = submit(client, api_key, body, model=model_name, id_column="id", chunk_size=3).json()
    wait_enqueued(settings, job["id"], 4)
    queue = queue_for_model(model_name)
    assert job["queue"] == queue
    raw = redis_client.lrange(queue, 0, -1)
    assert len(raw) == 4 == job["chunks"]
    for r in raw:
        decoded = base64.b64decode(json.loads(r)["body"])
        assert secret.encode() not in r and secret.encode() not in decoded
        assert b"number" not in decoded

    with pg(settings.database.url) as conn:
        chunks = {
            str(r[0]): r[1]
            for r in conn.execute(
                "SELECT id, seq FROM chunks WHERE job_id = %s", (job["id"],)
            ).fetchall()
        }
    seen = []
    for msg in _messages(redis_client, queue):
        assert msg["headers"]["task"] == TASK_RUN_CHUNK
        args, kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
        assert args == []
        assert list(kwargs) == ["chunk_id"]
        seen.append(kwargs["chunk_id"])
        # Flower shows job and chunk number, from the display form only.
        seq = chunks[kwargs["chunk_id"]]
        assert msg["headers"]["kwargsrepr"] == (f"{{'job': '{job['id']}', 'chunk': '{seq + 1}/4'}}")
    assert sorted(seen) == sorted(chunks)


def test_each_model_has_its_own_queue(
    client: TestClient,
    api_key: str,
    settings: Settings,
    redis_client: redis.Redis,
) -> None:
    a, b = f"org/model-a-{uuid.uuid4().hex[:6]}", f"/models/model-b-{uuid.uuid4().hex[:6]}"
    wait_enqueued(settings, submit(client, api_key, "text\nx\n", model=a).json()["id"], 1)
    job_b = submit(client, api_key, "text\nx\ny\n", model=b, chunk_size=1).json()
    wait_enqueued(settings, job_b["id"], 2)
    assert redis_client.llen(queue_for_model(a)) == 1
    assert redis_client.llen(queue_for_model(b)) == 2


def test_redis_down_the_job_is_kept_and_marked_for_resend(
    settings: Settings, api_key: str, model_name: str
) -> None:
    """Postgres is the truth: with the broker unreachable the submission still succeeds and
    its chunks stay queued with no ``enqueued_at``, for the reconciler to send."""
    from service.api.app import create_app

    broken = override(settings, broker={"url": "redis://127.0.0.1:1/0"})
    started = time.monotonic()
    with TestClient(create_app(broken)) as c:
        resp = submit(c, api_key, "text\na\nb\n", model=model_name, chunk_size=1)
    assert time.monotonic() - started < 30
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "queued"
    with pg(settings.database.url) as conn:
        rows = conn.execute(
            "SELECT state, enqueued_at FROM chunks WHERE job_id = %s", (resp.json()["id"],)
        ).fetchall()
    assert rows and all(state == "queued" and sent is None for state, sent in rows)
