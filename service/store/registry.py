"""The workers registry: which live worker serves which model, on what device.

A worker registers at start, heartbeats while it runs and unregisters at shutdown; the API
counts a model as served while a heartbeat is recent (``service.jobs.queries.live_workers``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from service.settings import Settings


def live_horizon_s(settings: Settings) -> float:
    """How recent a heartbeat must be for its worker to count as serving its model: three
    beats, or one lease, whichever is longer (a worker beats every min(lease_s/3, heartbeat))."""
    return 3 * max(settings.worker.heartbeat_s, settings.worker.lease_s / 3.0)


def register_worker(
    conn: Connection,
    name: str,
    model: str,
    queue: str,
    device: str,
    pid: int,
    ready: bool,
    slots: int = 1,
    capabilities: dict[str, Any] | None = None,
) -> None:
    """``slots``: chunks the worker runs at once; the dispatcher keeps that many released.
    ``capabilities``: what the engine says the model can do (None: every task)."""
    conn.execute(
        text(
            """
            INSERT INTO workers (name, model, queue, device, pid, engine_ready, slots,
                                 capabilities)
            VALUES (:name, :model, :queue, :device, :pid, :ready, :slots, :capabilities)
            ON CONFLICT (name) DO UPDATE SET model = excluded.model, queue = excluded.queue,
              device = excluded.device, pid = excluded.pid, engine_ready = excluded.engine_ready,
              slots = excluded.slots, capabilities = excluded.capabilities,
              started_at = now(), last_heartbeat_at = now()
            """
        ).bindparams(bindparam("capabilities", type_=JSONB)),
        {
            "name": name,
            "model": model,
            "queue": queue,
            "device": device,
            "pid": pid,
            "ready": ready,
            "slots": slots,
            "capabilities": capabilities,
        },
    )


def heartbeat(conn: Connection, name: str, ready: bool) -> bool:
    """False: the worker's row is gone (deleted by an operator or a namesake's shutdown), and
    the caller registers again, or its model would count as unserved and its slots as none."""
    done = conn.execute(
        text(
            "UPDATE workers SET last_heartbeat_at = now(), engine_ready = :ready WHERE name = :name"
        ),
        {"name": name, "ready": ready},
    )
    return bool(done.rowcount)


def unregister_worker(conn: Connection, name: str) -> None:
    conn.execute(text("DELETE FROM workers WHERE name = :name"), {"name": name})
