"""Rows that carry their own OpenAI request (a batch's ``chat`` job) through the real chunk
runner and store: each row's body decides its sampling, several choices land in the row's one
result, and a body the model cannot take fails that row alone."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb

from service.settings import Settings
from service.store.chunks import PgChunkStore
from service.store.engine import get_engine
from tests.support.helpers import chunk_rows, job_view, pg, submit
from workers.engines.base import Batch, GenRequest, TokenLogprob
from workers.engines.bench import BenchEngine
from workers.runner import process_chunk
from workers.runtime import Runtime


class RecordingEngine(BenchEngine):
    """The bench engine, keeping the requests it was given."""

    def __init__(self, model: str, max_model_len: int) -> None:
        super().__init__(model, max_model_len=max_model_len)
        self.seen: list[GenRequest] = []

    def submit(self, requests: list[GenRequest]) -> Batch:
        self.seen += requests
        batch = super().submit(requests)
        for res in batch.results:  # vLLM gives a token it rules out -inf
            if res is not None and res.choices and res.choices[0].logprobs:
                res.choices = tuple(
                    replace(c, logprobs=(TokenLogprob(c.text, float("-inf"), (("z", -math.inf),)),))
                    for c in res.choices
                )
        return batch


def chat_job(
    client: TestClient, key: str, settings: Settings, model: str, bodies: list[Any]
) -> str:
    """A job whose rows carry these request bodies, as a batch makes them (the native upload
    makes the rows; the task and bodies are then set as the batch path stores them)."""
    csv = "id,text\n" + "".join(f"req-{i},row {i}\n" for i in range(len(bodies)))
    job_id = str(
        submit(client, key, csv, model=model, task="generate", id_column="id").json()["id"]
    )
    with pg(settings.database.url) as conn:
        conn.execute(
            "UPDATE jobs SET task = 'chat', params = %s WHERE id = %s",
            (Jsonb({"default_max_tokens": 9}), job_id),
        )
        for i, body in enumerate(bodies, 1):
            conn.execute(
                "UPDATE documents SET extra = %s WHERE job_id = %s AND idx = %s",
                (Jsonb({"body": body}), job_id, i),
            )
    return job_id


def test_each_row_is_sampled_as_its_body_asks(
    client: TestClient, api_key: str, settings: Settings, model_name: str
) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b c"}]
    bodies: list[Any] = [
        {"model": model_name, "messages": messages},  # OpenAI's defaults
        {"model": model_name, "messages": messages, "n": 3, "temperature": 0.2, "seed": 5,
         "top_p": 0.5, "stop": "x", "max_completion_tokens": 4, "logprobs": True,
         "top_logprobs": 2},
        {"model": model_name, "messages": messages, "max_tokens": 500},  # no room for it
        {"model": model_name, "messages": messages, "tools": []},  # refused by name
        {"model": model_name, "messages": messages,
         "response_format": {"type": "json_schema",
                             "json_schema": {"name": "a", "schema": {"type": "object"}}}},
    ]  # fmt: skip
    job_id = chat_job(client, api_key, settings, model_name, bodies)
    engine = RecordingEngine(model_name, max_model_len=64)
    db = get_engine(settings.database.url)
    rt = Runtime(settings=settings, model=model_name, name="w@openai", engine=engine, db=db,
                 store=PgChunkStore.from_settings(settings, db))  # fmt: skip
    (chunk,) = chunk_rows(settings, job_id)
    assert process_chunk(rt, chunk[0]) == "done"

    plain, several, schema = engine.seen
    # OpenAI's defaults, not the native ones: temperature 1, top_p 1; max_tokens from the job.
    assert (plain.temperature, plain.top_p, plain.n, plain.max_tokens) == (1.0, 1.0, 1, 9)
    assert plain.prompt_token_ids == engine.tokenizer()("be brief\na b c").input_ids
    assert (several.n, several.temperature, several.seed, several.top_p) == (3, 0.2, 5, 0.5)
    assert (several.stop, several.max_tokens, several.logprobs) == (("x",), 4, 2)
    assert schema.json_schema is not None and json.loads(schema.json_schema) == {"type": "object"}

    with pg(settings.database.url) as conn:
        rows = conn.execute(
            "SELECT idx, output, error, choices, completion_tokens FROM results "
            "WHERE job_id = %s ORDER BY idx",
            (job_id,),
        ).fetchall()
    by_idx = {r[0]: r for r in rows}
    assert by_idx[1][2] is None and by_idx[1][3] is None  # one choice, no logprobs: no list
    choices = by_idx[2][3]
    assert [c["index"] for c in choices] == [0, 1, 2] and by_idx[2][4] == 3
    assert all(c["logprobs"] and c["logprobs"][0]["token"] == c["text"] for c in choices)
    # -inf has no JSON: OpenAI's floor, or PostgreSQL would refuse the whole write.
    assert choices[0]["logprobs"][0]["logprob"] == -9999.0
    assert choices[0]["logprobs"][0]["top_logprobs"] == [{"token": "z", "logprob": -9999.0}]
    assert "maximum context length is 64 tokens" in by_idx[3][2]
    assert "does not support the parameter 'tools'" in by_idx[4][2]
    assert by_idx[5][1] == "{}" and by_idx[5][2] is None
    job = job_view(client, api_key, job_id)
    assert job["counts"] == {"total": 5, "succeeded": 3, "failed": 2, "cancelled": 0}
