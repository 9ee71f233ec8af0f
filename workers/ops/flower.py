"""`docqueue flower`: Flower on docqueue's Celery app, with basic auth and bounded state.

Flower only listens to the broker (worker and task events, remote-control replies): it runs on
the workers' app (``workers.app``) without their tasks, so it needs no engine. Chunk tasks show
as ``docqueue.run_chunk`` with arguments ``{'job': ..., 'chunk': 'n/N'}`` and ids
``<job id>:<chunk index>:<suffix>`` (set by ``service.contract.send_chunks``); workers under their
Celery hostnames (``gpu0@host``, ``cpu-<pid>@host``).

Credentials reach Flower through its ``FLOWER_BASIC_AUTH`` environment variable, never through
the command line, where any local user could read them with ``ps``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from service.errors import ConfigError
from service.settings import Settings
from workers.app import app

__all__ = ["app"]  # ``celery -A workers.ops.flower`` finds the workers' app here


@dataclass(frozen=True)
class FlowerOptions:
    port: int
    address: str
    persistent: bool
    db_path: Path
    max_tasks: int
    state_save_interval_s: float
    basic_auth: str | None  # "user:password[,user2:password2]"; None: no auth (--no-auth)


def options(
    settings: Settings,
    *,
    port: int | None = None,
    address: str | None = None,
    persistent: bool | None = None,
    no_auth: bool = False,
) -> FlowerOptions:
    """Flower's options from the command line, falling back to settings; checks basic auth."""
    auth = (
        settings.flower.basic_auth.get_secret_value().strip() if settings.flower.basic_auth else ""
    )
    if not no_auth:
        if not auth:
            raise ConfigError(
                "Flower needs basic auth: set DOCQUEUE_FLOWER_BASIC_AUTH=user:password "
                "(or pass --no-auth on a trusted network)"
            )
        bad = [c for c in auth.split(",") if ":" not in c or not c.split(":", 1)[1]]
        if bad:
            raise ConfigError(
                "DOCQUEUE_FLOWER_BASIC_AUTH must be user:password (several: comma-separated)"
            )
    return FlowerOptions(
        port=port if port is not None else settings.flower.port,
        address=address if address is not None else settings.flower.address,
        persistent=settings.flower.persistent if persistent is None else persistent,
        db_path=settings.flower.db_path,
        max_tasks=settings.flower.max_tasks,
        state_save_interval_s=settings.flower.state_save_interval_s,
        basic_auth=None if no_auth else auth,
    )


def argv(opts: FlowerOptions) -> list[str]:
    """Arguments for ``celery -A workers.ops.flower flower`` (credentials excluded, see env())."""
    args = [
        "-A",
        "workers.ops.flower",
        "flower",
        f"--port={opts.port}",
        f"--address={opts.address}",
        f"--max_tasks={opts.max_tasks}",
        # Offline workers (a restarted GPU process has a new pid, same name) drop off in an hour.
        "--purge_offline_workers=3600",
    ]
    if opts.persistent:
        args += [
            "--persistent=True",
            f"--db={opts.db_path}",
            f"--state_save_interval={int(opts.state_save_interval_s * 1000)}",
        ]
    return args


def env(opts: FlowerOptions) -> dict[str, str]:
    """Environment for Flower: the credentials, or (``--no-auth``) an API open to all."""
    if opts.basic_auth:
        return {"FLOWER_BASIC_AUTH": opts.basic_auth}
    # Without auth, Flower 2 answers 401 on its API unless told that is intended.
    return {"FLOWER_UNAUTHENTICATED_API": "true"}


def run(opts: FlowerOptions) -> int:
    """Runs Flower in this process (so docqueue's logging applies) until it is stopped."""
    from celery.bin.celery import celery as celery_cli

    if opts.persistent:
        opts.db_path.parent.mkdir(parents=True, exist_ok=True)
    for name in ("FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API"):
        os.environ.pop(name, None)
    os.environ.update(env(opts))
    try:
        celery_cli.main(args=argv(opts), prog_name="docqueue flower", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
