from __future__ import annotations

import re
import uuid

from service.contract import ChunkMessage, make_celery, queue_for_model
from service.settings import BrokerSettings, Settings


def test_queue_names_are_readable_stable_and_distinct() -> None:
    a = queue_for_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert a == queue_for_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert a.startswith("dq.smollm2-135m-instruct.")
    # Same basename, different model: different queues.
    assert queue_for_model("/models/a/llama") != queue_for_model("/models/b/llama")
    for name in ("", "/", "weird name with spaces!", "x" * 500, "模型"):
        q = queue_for_model(name)
        assert re.fullmatch(r"dq\.[a-z0-9_.-]+\.[0-9a-f]{8}", q), q
        assert len(q) <= 70


def test_chunk_message_carries_the_chunk_id_only() -> None:
    msg = ChunkMessage(
        chunk_id=uuid.uuid4(), job_id=uuid.uuid4(), seq=2, n_chunks=9, queue="dq.m.0"
    )
    assert msg.kwargs() == {"chunk_id": str(msg.chunk_id)}
    assert msg.display() == f"{{'job': '{msg.job_id}', 'chunk': '3/9'}}"


def test_celery_app_is_configured_from_settings() -> None:
    s = Settings(broker=BrokerSettings(url="redis://example:6380/3", visibility_timeout_s=1234))
    app = make_celery(s)
    assert app.conf.broker_url == "redis://example:6380/3"
    assert app.conf.broker_transport_options["visibility_timeout"] == 1234
    assert app.conf.task_ignore_result is True
