"""A finished batch's output and error files on the real PostgreSQL, read back line by line and
parsed with the official openai SDK's own types: one line per request across both files, every
choice and logprob rendered, cancelled and expired batches answering for the rows that never
ran, and one pair of files however many finalizers race."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from openai import BaseModel as SdkModel
from openai.types import Completion
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Engine, text

from service.batches import finalize as fin
from service.files import store as files
from service.settings import Settings
from service.store.engine import get_engine, session_scope
from service.store.keys import authenticate, create_key
from tests.support.helpers import override

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


# OpenAI's BatchRequestOutput (its OpenAPI spec; this SDK version has no type for it), strict.
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpecResponse(_Strict):
    status_code: int
    request_id: str
    body: dict[str, Any]


class SpecError(_Strict):
    code: str
    message: str


class SpecLine(_Strict):
    id: str
    custom_id: str
    response: SpecResponse | None
    error: SpecError | None


def no_extras(value: Any, path: str = "") -> None:
    """The SDK's models keep unknown keys; a key OpenAI never sends is a bug here."""
    if isinstance(value, SdkModel):
        assert not value.model_extra, f"{path}: fields OpenAI does not send: {value.model_extra}"
        for name in type(value).model_fields:
            no_extras(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            no_extras(item, f"{path}[{i}]")


def sdk(cls: type[SdkModel], data: dict[str, Any]) -> Any:
    parsed = cls.model_validate(data)
    no_extras(parsed, cls.__name__)
    return parsed


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    return get_engine(settings.database.url)


@pytest.fixture(scope="module")
def paged(settings: Settings) -> Settings:
    """Two rows per page and small file parts: every test crosses page and part boundaries."""
    return override(settings, openai={"batch_finalize_page_rows": 2}, files={"part_bytes": 4096})


def new_tenant(settings: Settings) -> uuid.UUID:
    with session_scope(settings.database.url) as session:
        key = create_key(session, f"batches-{uuid.uuid4().hex[:8]}")
        return authenticate(session, f"Bearer {key}").tenant_id


def make_batch(
    engine: Engine,
    tenant: uuid.UUID,
    bodies: list[dict[str, Any]],
    *,
    endpoint: str = CHAT,
    job_status: str = "completed",
    chunk_size: int | None = None,
    expires_in_s: float = 24 * 3600,
    batch_status: str = "in_progress",
) -> tuple[uuid.UUID, uuid.UUID]:
    """A batch and its job with one document per body (custom ids ``r1``..``rN``), as
    ``lifecycle`` makes them; chunks of ``chunk_size`` rows, all queued, when given."""
    job_id, batch_id = uuid.uuid4(), uuid.uuid4()
    task = "chat" if endpoint == CHAT else "completion"
    n = len(bodies)
    size = chunk_size or max(n, 1)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant_id, task, model, queue, params, status, chunk_size,"
                " n_chunks, total) VALUES (:j, :t, :task, 'served/model', 'q', '{}', :s, :c,"
                " :nc, :n)"
            ),
            {
                "j": job_id, "t": tenant, "task": task, "s": job_status, "c": size,
                "nc": (n + size - 1) // size, "n": n,
            },
        )  # fmt: skip
        for i, body in enumerate(bodies, 1):
            conn.execute(
                text(
                    "INSERT INTO documents (job_id, idx, external_id, text, extra) "
                    "VALUES (:j, :i, :c, 'x', CAST(:e AS jsonb))"
                ),
                {"j": job_id, "i": i, "c": f"r{i}", "e": json.dumps({"body": body})},
            )
        if chunk_size:
            for seq, start in enumerate(range(1, n + 1, size)):
                conn.execute(
                    text(
                        "INSERT INTO chunks (id, job_id, seq, start_idx, end_idx, state) "
                        "VALUES (:id, :j, :s, :a, :b, 'queued')"
                    ),
                    {"id": uuid.uuid4(), "j": job_id, "s": seq, "a": start,
                     "b": min(start + size, n + 1)},
                )  # fmt: skip
        conn.execute(
            text(
                "INSERT INTO batches (id, tenant_id, job_id, input_file_id, endpoint, "
                "completion_window, model, status, expires_at, in_progress_at) VALUES "
                "(:b, :t, :j, :f, :e, '24h', 'gpt-4o-mini', :s, "
                "now() + make_interval(secs => :x), now())"
            ),
            {"b": batch_id, "t": tenant, "j": job_id, "f": uuid.uuid4(), "e": endpoint,
             "s": batch_status, "x": expires_in_s},
        )  # fmt: skip
    return batch_id, job_id


def add_result(
    engine: Engine,
    job_id: uuid.UUID,
    idx: int,
    *,
    output: str | None = None,
    finish_reason: str | None = "stop",
    error: str | None = None,
    choices: list[dict[str, Any]] | None = None,
    prompt_tokens: int = 7,
    completion_tokens: int = 3,
) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO results (job_id, idx, output, finish_reason, prompt_tokens, "
                "completion_tokens, error, choices) VALUES (:j, :i, :o, :f, :p, :c, :e, "
                "CAST(:ch AS jsonb))"
            ),
            {
                "j": job_id, "i": idx, "o": output, "f": None if error else finish_reason,
                "p": 0 if error else prompt_tokens, "c": 0 if error else completion_tokens,
                "e": error, "ch": None if choices is None else json.dumps(choices),
            },
        )  # fmt: skip


def batch_row(engine: Engine, batch_id: uuid.UUID) -> Any:
    with engine.connect() as conn:
        return conn.execute(text("SELECT * FROM batches WHERE id = :b"), {"b": batch_id}).one()


def lines_of(engine: Engine, tenant: uuid.UUID, file_id: uuid.UUID | None) -> list[SpecLine]:
    assert file_id is not None
    raw = list(files.open_lines(engine, tenant, file_id, max_line_bytes=1 << 20))
    return [SpecLine.model_validate_json(line) for line in raw]


def tenant_files(engine: Engine, tenant: uuid.UUID) -> list[tuple[uuid.UUID, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, status, filename FROM files WHERE tenant_id = :t"), {"t": tenant}
        ).all()
    return [(r.id, r.status, r.filename) for r in rows]


def chat(model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def logprob_tokens(*tokens: str) -> list[dict[str, Any]]:
    return [
        {
            "token": t,
            "logprob": -0.5 * (i + 1),
            "top_logprobs": [
                {"token": t, "logprob": -0.5 * (i + 1)},
                {"token": t + "?", "logprob": -3.0},
            ],
        }
        for i, t in enumerate(tokens)
    ]


def test_a_chat_batch_writes_real_chat_completions_and_each_row_error_once(
    engine: Engine, paged: Settings
) -> None:
    tenant = new_tenant(paged)
    bodies = [
        chat(),
        chat(n=2, logprobs=True, top_logprobs=2),
        chat(tools=[{"type": "function"}]),  # a field docqueue refuses: the request's own error
        chat(max_tokens=5000),
        chat(),
    ]
    batch_id, job_id = make_batch(engine, tenant, bodies)
    add_result(engine, job_id, 1, output="Hello there", finish_reason="stop")
    add_result(
        engine,
        job_id,
        2,
        output="A b",
        completion_tokens=5,
        choices=[
            {"index": 0, "text": "A b", "finish_reason": "stop", "completion_tokens": 2,
             "logprobs": logprob_tokens("A", " b")},
            {"index": 1, "text": "Café", "finish_reason": "length", "completion_tokens": 3,
             "logprobs": [*logprob_tokens("Caf"), {"token": "é", "logprob": None,
                                                   "top_logprobs": []}]},
        ],
    )  # fmt: skip
    add_result(engine, job_id, 3, error="docqueue does not support the parameter 'tools'")
    add_result(
        engine,
        job_id,
        4,
        error="this model's maximum context length is 2048 tokens; the request has 9 prompt "
        "tokens and asks for 5000 more",
    )
    add_result(engine, job_id, 5, error="chunk failed: the engine stalled")

    assert fin.finalize(engine, batch_id, paged) == "completed"

    batch = batch_row(engine, batch_id)
    assert batch.status == "completed"
    assert batch.completed_at is not None and batch.finalizing_at is not None
    assert batch.cancelled_at is None and batch.expired_at is None
    out = lines_of(engine, tenant, batch.output_file_id)
    err = lines_of(engine, tenant, batch.error_file_id)
    assert [x.custom_id for x in out] == ["r1", "r2"]
    assert [x.custom_id for x in err] == ["r3", "r4", "r5"]
    ids = [x.id for x in out + err]
    assert len(set(ids)) == 5 and all(i.startswith("batch_req_") for i in ids)

    completions = []
    for line in out:
        assert line.error is None and line.response is not None
        assert line.response.status_code == 200
        completions.append(sdk(ChatCompletion, line.response.body))
    first, second = completions
    assert first.id.startswith("chatcmpl-") and first.model == "gpt-4o-mini"
    assert first.object == "chat.completion"
    assert abs(first.created - datetime.now(UTC).timestamp()) < 120
    assert first.choices[0].message.content == "Hello there"
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.refusal is None
    assert first.choices[0].logprobs is None and first.choices[0].finish_reason == "stop"
    assert first.usage is not None
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (7, 3)
    assert first.usage.total_tokens == 10

    assert [c.index for c in second.choices] == [0, 1]
    assert [c.message.content for c in second.choices] == ["A b", "Café"]
    assert [c.finish_reason for c in second.choices] == ["stop", "length"]
    assert second.usage is not None and second.usage.completion_tokens == 5
    tokens = second.choices[0].logprobs.content
    assert [t.token for t in tokens] == ["A", " b"]
    assert [t.logprob for t in tokens] == [-0.5, -1.0]
    assert tokens[1].bytes == [32, 98]
    assert [(a.token, a.logprob, a.bytes) for a in tokens[0].top_logprobs] == [
        ("A", -0.5, [65]),
        ("A?", -3.0, [65, 63]),
    ]
    last = second.choices[1].logprobs.content[-1]
    assert (last.token, last.logprob, last.bytes) == ("é", -9999.0, [195, 169])

    unsupported, too_long, server = (x.response for x in err)
    for line in err:
        assert line.error is None and line.response is not None
    assert unsupported is not None and unsupported.status_code == 400
    assert unsupported.body == {
        "error": {
            "message": "docqueue does not support the parameter 'tools'",
            "type": "invalid_request_error",
            "param": "tools",
            "code": "unsupported_parameter",
        }
    }
    assert too_long is not None and too_long.status_code == 400
    assert too_long.body["error"]["code"] == "context_length_exceeded"
    assert too_long.body["error"]["param"] == "messages"
    assert server is not None and server.status_code == 500
    assert server.body["error"]["type"] == "server_error"
    assert server.body["error"]["message"] == "chunk failed: the engine stalled"

    # Nothing left to do: a second call changes nothing.
    assert fin.finalize(engine, batch_id, paged) is None
    assert {f[0] for f in tenant_files(engine, tenant)} == {
        batch.output_file_id,
        batch.error_file_id,
    }
    names = {f[2] for f in tenant_files(engine, tenant)}
    assert names == {f"batch_{batch_id.hex}_output.jsonl", f"batch_{batch_id.hex}_error.jsonl"}


def test_a_completions_batch_writes_text_completions_with_legacy_logprobs(
    engine: Engine, paged: Settings
) -> None:
    tenant = new_tenant(paged)
    bodies: list[dict[str, Any]] = [
        {"model": "gpt-4o-mini", "prompt": "Say:", "logprobs": 1},
        {"model": "gpt-4o-mini", "prompt": ["Go"], "n": 2},
        {"model": "gpt-4o-mini", "prompt": "x"},
    ]
    batch_id, job_id = make_batch(engine, tenant, bodies, endpoint=COMPLETIONS)
    add_result(
        engine,
        job_id,
        1,
        output=" hi you",
        choices=[{"index": 0, "text": " hi you", "finish_reason": "length",
                  "completion_tokens": 2, "logprobs": logprob_tokens(" hi", " you")}],
    )  # fmt: skip
    add_result(
        engine,
        job_id,
        2,
        output="a",
        choices=[
            {"index": 0, "text": "a", "finish_reason": "stop", "completion_tokens": 1,
             "logprobs": None},
            {"index": 1, "text": "b", "finish_reason": None, "completion_tokens": 1,
             "logprobs": None},
        ],
    )  # fmt: skip
    add_result(engine, job_id, 3, output="plain", finish_reason="length")

    assert fin.finalize(engine, batch_id, paged) == "completed"
    batch = batch_row(engine, batch_id)
    assert batch.error_file_id is None  # no errors: no error file, as OpenAI does
    out = lines_of(engine, tenant, batch.output_file_id)
    assert [x.custom_id for x in out] == ["r1", "r2", "r3"]
    bodies_out = [x.response.body for x in out if x.response is not None]
    first, second, third = (sdk(Completion, b) for b in bodies_out)
    assert first.object == "text_completion" and first.id.startswith("cmpl-")
    assert first.model == "gpt-4o-mini"
    lp = first.choices[0].logprobs
    assert lp is not None
    assert lp.tokens == [" hi", " you"] and lp.token_logprobs == [-0.5, -1.0]
    assert lp.top_logprobs == [{" hi": -0.5, " hi?": -3.0}, {" you": -1.0, " you?": -3.0}]
    assert lp.text_offset == [4, 7]  # after the prompt "Say:"
    assert first.choices[0].finish_reason == "length"
    assert [(c.index, c.text, c.finish_reason) for c in second.choices] == [
        (0, "a", "stop"),
        (1, "b", "stop"),
    ]
    assert second.choices[0].logprobs is None
    assert third.choices[0].text == "plain" and third.choices[0].finish_reason == "length"
    assert third.usage is not None and third.usage.total_tokens == 10


def test_a_cancelled_batch_keeps_finished_rows_and_names_the_rest_batch_cancelled(
    engine: Engine, paged: Settings
) -> None:
    tenant = new_tenant(paged)
    batch_id, job_id = make_batch(
        engine, tenant, [chat() for _ in range(5)], job_status="cancelled",
        batch_status="cancelling",
    )  # fmt: skip
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE batches SET cancelling_at = now() WHERE id = :b"), {"b": batch_id}
        )
    add_result(engine, job_id, 2, output="done")
    add_result(engine, job_id, 4, error="chunk failed: boom")

    assert fin.finalize(engine, batch_id, paged) == "cancelled"
    batch = batch_row(engine, batch_id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    assert batch.completed_at is None and batch.expired_at is None
    out = lines_of(engine, tenant, batch.output_file_id)
    err = lines_of(engine, tenant, batch.error_file_id)
    assert [x.custom_id for x in out] == ["r2"]
    sdk(ChatCompletion, out[0].response.body if out[0].response else {})
    assert [x.custom_id for x in err] == ["r1", "r3", "r4", "r5"]
    never_ran = [x for x in err if x.custom_id != "r4"]
    for line in never_ran:
        assert line.response is None
        assert line.error is not None and line.error.code == "batch_cancelled"
    failed = next(x for x in err if x.custom_id == "r4")
    assert failed.error is None and failed.response is not None
    assert failed.response.status_code == 500


def test_the_sweep_expires_a_batch_past_its_window_through_the_chunk_store(
    engine: Engine, paged: Settings
) -> None:
    tenant = new_tenant(paged)
    # Rows 1-2 ran (chunk 0 done); rows 3-4 wait in a queued chunk when the window ends.
    batch_id, job_id = make_batch(
        engine, tenant, [chat() for _ in range(4)], job_status="running", chunk_size=2,
        expires_in_s=-1,
    )  # fmt: skip
    add_result(engine, job_id, 1, output="one")
    add_result(engine, job_id, 2, output="two")
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE chunks SET state = 'done' WHERE job_id = :j AND seq = 0"), {"j": job_id}
        )
    # Another batch of the same tenant, still inside its window, is left alone.
    open_id, open_job = make_batch(engine, tenant, [chat()], job_status="running", chunk_size=1)

    fin.sweep(engine, paged)  # (or a worker's own sweep: the e2e session shares this database)

    with engine.connect() as conn:
        status = conn.execute(text("SELECT status FROM jobs WHERE id = :j"), {"j": job_id})
        assert status.scalar() == "cancelled"
        still = conn.execute(text("SELECT status FROM jobs WHERE id = :j"), {"j": open_job})
        assert still.scalar() == "running"
    batch = batch_row(engine, batch_id)
    assert batch.status == "expired" and batch.expired_at is not None
    assert batch.cancelled_at is None
    assert batch_row(engine, open_id).status == "in_progress"
    out = lines_of(engine, tenant, batch.output_file_id)
    err = lines_of(engine, tenant, batch.error_file_id)
    assert [x.custom_id for x in out] == ["r1", "r2"]
    assert [(x.custom_id, x.error.code if x.error else None) for x in err] == [
        ("r3", "batch_expired"),
        ("r4", "batch_expired"),
    ]
    assert all(x.response is None for x in err)


def test_the_sweep_leaves_running_batches_and_finalizes_finished_ones(
    engine: Engine, paged: Settings
) -> None:
    tenant = new_tenant(paged)
    running, _ = make_batch(engine, tenant, [chat()], job_status="running")
    done, done_job = make_batch(engine, tenant, [chat()], job_status="completed")
    add_result(engine, done_job, 1, output="ok")
    fin.sweep(engine, paged)
    assert batch_row(engine, running).status == "in_progress"
    finished = batch_row(engine, done)
    assert finished.status == "completed" and finished.output_file_id is not None
    assert finished.error_file_id is None


def test_concurrent_finalizers_make_one_pair_of_files(engine: Engine, paged: Settings) -> None:
    tenant = new_tenant(paged)
    batch_id, job_id = make_batch(engine, tenant, [chat() for _ in range(6)])
    for i in range(1, 7):
        add_result(engine, job_id, i, output=f"row {i}", error="chunk failed" if i == 6 else None)
    start = threading.Barrier(4)
    outcomes: list[str | None] = []

    def run() -> None:
        start.wait()
        outcomes.append(fin.finalize(engine, batch_id, paged))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # One of them finalized it, or none did: a reconciler's sweep elsewhere (the e2e session's
    # worker shares this database) may have won the claim first. Either way, one pair of files.
    assert outcomes.count("completed") <= 1 and set(outcomes) <= {None, "completed"}
    batch = batch_row(engine, batch_id)
    assert batch.status == "completed"
    made = tenant_files(engine, tenant)
    assert {f[0] for f in made} == {batch.output_file_id, batch.error_file_id}
    assert all(f[1] == "processed" for f in made)
    assert len(lines_of(engine, tenant, batch.output_file_id)) == 5


def test_a_stale_finalizing_batch_is_retaken_and_the_late_loser_writes_nothing(
    engine: Engine, paged: Settings
) -> None:
    tenant = new_tenant(paged)
    batch_id, job_id = make_batch(engine, tenant, [chat(), chat()])
    add_result(engine, job_id, 1, output="a")
    add_result(engine, job_id, 2, output="b")
    dead = fin._claim(engine, batch_id, paged)  # a finalizer that claimed, then stalled
    assert dead is not None
    assert fin.finalize(engine, batch_id, paged) is None  # its claim is fresh: left alone
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE batches SET finalizing_at = finalizing_at - interval '1 hour' "
                 "WHERE id = :b"),
            {"b": batch_id},
        )  # fmt: skip

    assert fin.finalize(engine, batch_id, paged) == "completed"
    winner = batch_row(engine, batch_id)
    # The stalled one wakes up and tries to finish: refused, the winner's files stay.
    assert not fin._finish(engine, dead, dead.token, uuid.uuid4(), uuid.uuid4())
    after = batch_row(engine, batch_id)
    assert (after.status, after.output_file_id, after.error_file_id) == (
        "completed",
        winner.output_file_id,
        None,
    )


def test_a_finalizer_that_loses_its_claim_mid_way_deletes_what_it_wrote(
    engine: Engine, paged: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = new_tenant(paged)
    batch_id, job_id = make_batch(engine, tenant, [chat() for _ in range(5)])
    for i in range(1, 6):
        add_result(engine, job_id, i, output="x", error="chunk failed" if i == 5 else None)
    renew = fin._renew

    def taken_over(engine: Engine, batch: uuid.UUID, token: datetime) -> datetime | None:
        with engine.begin() as conn:  # another finalizer retakes it meanwhile
            conn.execute(
                text("UPDATE batches SET finalizing_at = clock_timestamp() WHERE id = :b"),
                {"b": batch},
            )
        return renew(engine, batch, token)

    monkeypatch.setattr(fin, "_renew", taken_over)
    assert fin.finalize(engine, batch_id, paged) is None
    assert tenant_files(engine, tenant) == []
    batch = batch_row(engine, batch_id)
    assert batch.status == "finalizing" and batch.output_file_id is None


def test_a_batch_cancelled_before_its_file_was_read_finalizes_without_files(
    engine: Engine, paged: Settings
) -> None:
    tenant = new_tenant(paged)
    batch_id, _ = make_batch(engine, tenant, [], job_status="cancelled", batch_status="cancelling")
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE batches SET cancelling_at = now() WHERE id = :b"), {"b": batch_id}
        )
    assert fin.finalize(engine, batch_id, paged) == "cancelled"
    batch = batch_row(engine, batch_id)
    assert (batch.output_file_id, batch.error_file_id) == (None, None)
    assert tenant_files(engine, tenant) == []


@pytest.mark.parametrize(
    ("job", "user", "past", "want"),
    [
        ("completed", False, False, "completed"),
        ("failed", False, False, "completed"),
        ("completed", False, True, "completed"),
        ("cancelled", True, True, "cancelled"),
        ("cancelled", False, True, "expired"),
        ("cancelled", False, False, "cancelled"),
    ],
)
def test_final_status_names_how_the_batch_ended(
    job: str, user: bool, past: bool, want: str
) -> None:
    assert fin.final_status(job, user, past) == want


def test_the_claim_token_is_fresh_per_claim(engine: Engine, paged: Settings) -> None:
    """Guard for the fence: a retake must draw a token the old claim does not hold."""
    tenant = new_tenant(paged)
    batch_id, _ = make_batch(engine, tenant, [])
    first = fin._claim(engine, batch_id, paged)
    assert first is not None
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE batches SET finalizing_at = finalizing_at - interval '1 hour' "
                 "WHERE id = :b"),
            {"b": batch_id},
        )  # fmt: skip
    second = fin._claim(engine, batch_id, paged)
    assert second is not None and second.token > first.token


def test_a_reconciler_pass_finalizes_finished_batches(engine: Engine, settings: Settings) -> None:
    from service.contract import make_celery
    from service.store.chunks import PgChunkStore
    from workers.ops.reconciler import reconcile

    tenant = new_tenant(settings)
    batch_id, job_id = make_batch(engine, tenant, [chat(), chat()])
    add_result(engine, job_id, 1, output="ok")
    add_result(engine, job_id, 2, error="chunk failed: boom")
    app = make_celery(settings)
    try:
        report = reconcile(PgChunkStore.from_settings(settings, engine), app, settings)
    finally:
        app.close()
    assert report.batches is not None and report.batches.finalized.get("completed", 0) >= 1
    batch = batch_row(engine, batch_id)
    assert batch.status == "completed"
    assert batch.output_file_id is not None and batch.error_file_id is not None
