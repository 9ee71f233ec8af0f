"""What the broker holds: the chunk ids waiting in kombu's Redis queues or delivered unacked.

kombu has no API to list a queue without consuming it, so this reads its Redis layout (lists
per queue, the ``unacked`` hash and its index) read-only. Only the reconciler uses it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Iterable
from typing import Any

from service.contract import TASK_RUN_CHUNK

#: Where kombu's Redis transport keeps delivered, not yet acknowledged messages, and when
#: each was delivered.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


def chunk_ids_in_broker(
    client: Any, queues: Iterable[str], unacked_max_age_s: float | None = None
) -> set[str]:
    """Chunk ids that have a message waiting in ``queues`` or delivered but unacked.

    The reconciler re-sends a queued chunk only when its id is in neither place, so a message
    lost with a flushed or restarted Redis is replaced, and one still waiting is not doubled.
    With ``unacked_max_age_s``, only recent deliveries count: a worker claims its chunk within
    milliseconds of delivery, so an old delivery of a still-queued chunk went to a dead worker.
    """
    found: set[str] = set()

    def take(envelope: Any) -> None:
        try:
            body = json.loads(base64.b64decode(envelope["body"]))
            if envelope.get("headers", {}).get("task") == TASK_RUN_CHUNK:
                found.add(str(body[1]["chunk_id"]))
        except (KeyError, IndexError, TypeError, ValueError):
            pass  # not one of ours

    wanted = set(queues)
    for queue in wanted:
        for raw in client.lrange(queue, 0, -1):
            with contextlib.suppress(ValueError):
                take(json.loads(raw))
    if unacked_max_age_s is None:
        unacked = client.hvals(UNACKED_KEY)
    else:
        tags = client.zrangebyscore(UNACKED_INDEX_KEY, time.time() - unacked_max_age_s, "+inf")
        unacked = [raw for raw in client.hmget(UNACKED_KEY, tags) if raw] if tags else []
    for raw in unacked:
        with contextlib.suppress(ValueError, IndexError, TypeError):
            envelope, _exchange, routing_key = json.loads(raw)
            if routing_key in wanted:
                take(envelope)
    return found
