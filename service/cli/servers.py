"""The process commands: ``api``, ``worker``, ``flower``, ``beat`` and ``db upgrade``.

These are the only code under ``service/`` that may import ``workers``, and only inside the
command functions: a producer's machine runs the rest of the CLI without the GPU stack installed.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer
from pydantic import ValidationError

from service.cli import options
from service.cli.output import err, fail, out, redact_url, with_engine
from service.errors import ConfigError
from service.settings import DatabaseSettings, get_settings

#: Merged into the root app; the order here is the order ``docqueue --help`` lists them.
app = typer.Typer()
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


@app.command()
def beat(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
    concurrency: Annotated[
        int | None, typer.Option(help="Ops tasks in flight (default: DOCQUEUE_BEAT_CONCURRENCY).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the command, start nothing.")
    ] = False,
) -> None:
    """Run beat (schedules, reconciler, retention) in a small ops worker. Run exactly one."""
    from workers.ops.beat import command

    cmd = command(loglevel, concurrency)
    if dry_run:
        out.print(" ".join(cmd), highlight=False)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # Celery takes over this process: signals reach it directly


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    workers: Annotated[int, typer.Option(help="Server processes.")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    import uvicorn

    from service.logs import uvicorn_log_config

    s = get_settings()
    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=host or s.api.host,
        port=port or s.api.port,
        workers=workers,
        log_level=log_level,
        log_config=uvicorn_log_config(),  # applied in every server process
    )


@app.command()
def worker(
    model: Annotated[
        str | None, typer.Option(help="Model this worker serves (default: settings).")
    ] = None,
    gpus: Annotated[
        str, typer.Option(help="all | none | a list like 0,1 (one worker per GPU).")
    ] = "all",
    tensor_parallel: Annotated[int, typer.Option(help="GPUs per worker.")] = 1,
    concurrency: Annotated[int | None, typer.Option(help="Chunks in flight per engine.")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus /metrics; the i-th GPU process on PORT+i."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan, start nothing.")
    ] = False,
    engine: options.Engine = None,
) -> None:
    """Start one Celery worker per GPU (or one CPU worker), each running the model's engine."""
    from workers import launcher

    s = with_engine(get_settings(), engine)
    if engine is not None:
        os.environ["DOCQUEUE_ENGINE"] = s.engine.kind  # the worker processes' setting
    model = model or s.jobs.default_model
    if s.engine.kind == "vllm":
        from workers.engines import refuse_classifier

        try:
            refuse_classifier(model)
        except ConfigError as exc:
            fail(exc.message)
    try:
        specs = launcher.plan(gpus, tensor_parallel)
    except ValueError as exc:
        fail(str(exc))
    specs = launcher.with_metrics_ports(specs, metrics_port or s.worker.metrics_port)
    conc = concurrency or s.worker.concurrency
    if dry_run:
        plan = [
            {
                "hostname": spec.hostname,
                "CUDA_VISIBLE_DEVICES": spec.devices,
                "metrics_port": spec.env.get("DOCQUEUE_WORKER_METRICS_PORT"),
                "command": launcher.command(spec, model, conc, loglevel),
            }
            for spec in specs
        ]
        out.print_json(json.dumps(plan))
        return
    raise typer.Exit(launcher.supervise(specs, model, conc, tensor_parallel, loglevel))


@app.command()
def flower(
    port: Annotated[int | None, typer.Option(help="Port (default: 5555).")] = None,
    address: Annotated[str | None, typer.Option(help="Bind address (default: 127.0.0.1).")] = None,
    persistent: Annotated[
        bool | None,
        typer.Option(
            "--persistent/--no-persistent",
            help="Keep task history across restarts (DOCQUEUE_FLOWER_DB_PATH).",
        ),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Run without basic auth (trusted networks only).")
    ] = False,
) -> None:
    """Start Flower on docqueue's broker: workers by GPU hostname, chunk tasks by job and chunk.

    Needs DOCQUEUE_FLOWER_BASIC_AUTH=user:password unless --no-auth is given.
    """
    from workers.ops import flower as flower_mod

    try:
        opts = flower_mod.options(
            get_settings(), port=port, address=address, persistent=persistent, no_auth=no_auth
        )
    except ConfigError as exc:
        fail(str(exc), code=2)
    if no_auth:
        err.print("[yellow]warning:[/] Flower runs without authentication", highlight=False)
    raise typer.Exit(flower_mod.run(opts))


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    app_role: Annotated[
        str | None,
        typer.Option(
            help="Role the API and workers connect as, made or updated after migrating "
            "(default: DOCQUEUE_DB_APP_ROLE; its password from DOCQUEUE_DB_APP_PASSWORD only)."
        ),
    ] = None,
) -> None:
    """Apply migrations up to REVISION (default: head) as the schema's owner, then create or
    update the application's role (rights on rows only) when one is configured."""
    from service.store.migrate import ensure_app_role, upgrade

    s = get_settings()
    url = s.database.url
    role = app_role or s.database.app_role
    password = s.database.app_password.get_secret_value() if s.database.app_password else ""
    if app_role is not None:
        try:  # the rule DOCQUEUE_DB_APP_ROLE follows
            DatabaseSettings(app_role=app_role)
        except ValidationError:
            fail(f"--app-role {app_role!r}: lowercase letters, digits and '_', not first a digit")
    if role is not None and not password:
        fail(f"role {role!r} needs DOCQUEUE_DB_APP_PASSWORD", code=2)
    try:
        upgrade(url, revision)
    except Exception as exc:  # connection refused, missing database ...
        fail(f"migration failed: {exc}")
    out.print(f"database at {redact_url(url)} is at revision {revision}")
    if role is None:
        return
    try:
        ensure_app_role(url, role, password)
    except ConfigError as exc:
        fail(str(exc), code=2)
    except Exception as exc:  # not the database's owner, connection lost ...
        fail(f"setting up role {role!r} failed: {exc}")
    out.print(f"role {role} may read and write docqueue's rows (no DDL, not a superuser)")
