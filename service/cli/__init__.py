"""The ``docqueue`` command line: the API server, admin commands, and an HTTP client for jobs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from service import __version__
from service.cli import collections as cli_collections
from service.cli.client import ApiError, Client
from service.errors import ConfigError
from service.settings import get_settings

app = typer.Typer(
    name="docqueue",
    help="Bulk LLM work over documents (generate, summarize, classify) as asynchronous jobs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (stored hashed; shown once).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(cli_collections.collections_app, name="collections")
app.add_typer(cli_collections.schedules_app, name="schedules")
app.command()(cli_collections.beat)

out = Console()
err = Console(stderr=True)
TERMINAL = {"completed", "failed", "cancelled"}


def _version(value: bool) -> None:
    if value:
        out.print(f"docqueue {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """docqueue: submit CSVs of documents, follow the jobs, download the results."""
    from service import logs

    try:
        logs.configure()  # one format for every command (DOCQUEUE_LOG_FORMAT, DOCQUEUE_LOG_LEVEL)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        _fail(f"invalid settings: {exc}")


def _client() -> Client:
    s = get_settings()
    if not s.api_key:
        _fail(
            "no API key: set DOCQUEUE_API_KEY "
            "(create one with `docqueue keys create --tenant NAME`)"
        )
    return Client(s.api_url, s.api_key, s.http_timeout_s)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def _run(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except ApiError as exc:
        _fail(exc.message)


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
        host=host or s.api_host,
        port=port or s.api_port,
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
) -> None:
    """Start one Celery worker per GPU (or one CPU worker), each running the model's engine."""
    from workers import launcher

    s = get_settings()
    model = model or s.default_model
    try:
        specs = launcher.plan(gpus, tensor_parallel)
    except ValueError as exc:
        _fail(str(exc))
    specs = launcher.with_metrics_ports(specs, metrics_port or s.worker_metrics_port)
    conc = concurrency or s.worker_concurrency
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
        _fail(str(exc), code=2)
    if no_auth:
        err.print("[yellow]warning:[/] Flower runs without authentication", highlight=False)
    raise typer.Exit(flower_mod.run(opts))


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply migrations up to REVISION (default: head)."""
    from service.store.migrate import upgrade

    url = get_settings().database_url
    try:
        upgrade(url, revision)
    except Exception as exc:  # connection refused, missing database ...
        _fail(f"migration failed: {exc}")
    out.print(f"database at {_redact(url)} is at revision {revision}")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name; created if it does not exist.")],
) -> None:
    """Create an API key for TENANT and print it (the only time it is shown)."""
    from service.store.engine import session_scope
    from service.store.keys import create_key

    try:
        with session_scope() as session:
            key = create_key(session, tenant)
    except Exception as exc:
        _fail(f"could not create a key: {exc}")
    err.print(f"API key for tenant {tenant!r} (store it now; it is not shown again):")
    out.print(key, highlight=False)


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    task: Annotated[str, typer.Option(help="generate | summarize | classify")],
    model: Annotated[
        str | None, typer.Option(help="Model name or path (default: server's).")
    ] = None,
    text_column: Annotated[str, typer.Option(help="Column holding the document text.")] = "text",
    id_column: Annotated[str | None, typer.Option(help="Column with unique ids.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Template with {text} and columns.")] = None,
    labels: Annotated[str | None, typer.Option(help="classify: a,b,c or a JSON list.")] = None,
    max_tokens: Annotated[int | None, typer.Option()] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Documents per chunk.")] = None,
    priority: Annotated[str, typer.Option(help="interactive | bulk")] = "interactive",
    delimiter: Annotated[
        str | None, typer.Option(help="',' ';' or 'tab' (default: sniffed).")
    ] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Same key, same job.")] = None,
    summary_words: Annotated[int | None, typer.Option(help="summarize: summary length.")] = None,
    language: Annotated[str | None, typer.Option(help="summarize: output language.")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the job with a progress bar.")
    ] = False,
    poll_s: Annotated[float, typer.Option(help="Seconds between polls with --wait.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
) -> None:
    """Submit FILE (CSV) as a job."""
    fields = {
        "task": task,
        "model": model,
        "text_column": text_column,
        "id_column": id_column,
        "prompt": prompt,
        "labels": labels,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "chunk_size": chunk_size,
        "priority": priority,
        "delimiter": delimiter,
        "summary_words": summary_words,
        "language": language,
    }
    with _client() as client:
        size = file.stat().st_size
        with Progress(
            TextColumn("uploading {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=err,
            transient=True,
            disable=size < 4 * 1024 * 1024,
        ) as progress:
            bar = progress.add_task(file.name, total=size)
            job = _run(
                client.submit,
                file,
                fields,
                idempotency_key=idempotency_key,
                on_upload=lambda n: progress.advance(bar, n),
            )
        if as_json:
            out.print_json(json.dumps(job))
        else:
            if job.get("warning"):
                err.print(f"[yellow]warning:[/] {job['warning']}", highlight=False)
            counts = job["counts"]
            out.print(
                f"job [bold]{job['id']}[/] {job['status']}: {counts['total']} documents "
                f"in {job['chunks']} chunks, model {job['model']}"
            )
        if wait:
            final = _follow(client, job, poll_s)
            if final["status"] != "completed":
                raise typer.Exit(1)


def _follow(client: Client, job: dict[str, Any], poll_s: float) -> dict[str, Any]:
    """Polls until the job ends, with a bar: done/total, documents/s, ETA."""
    total = job["counts"]["total"] or None
    with Progress(
        TextColumn("[bold]{task.fields[status]:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]} docs/s"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        bar = progress.add_task("job", total=total, status=job["status"], rate="-", eta="-")
        while True:
            c = job["counts"]
            done = c["succeeded"] + c["failed"] + c["cancelled"]
            rate = job.get("documents_per_s")
            eta = job.get("eta_s")
            progress.update(
                bar,
                completed=done,
                status=job["status"],
                rate=f"{rate:,.1f}" if rate else "-",
                eta=f"{eta:,.0f}s" if eta is not None else "-",
            )
            if job["status"] in TERMINAL:
                break
            time.sleep(poll_s)
            job = _run(client.job, job["id"])
    c = job["counts"]
    style = "green" if job["status"] == "completed" else "red"
    out.print(
        f"job {job['id']} [{style}]{job['status']}[/]: {c['succeeded']} succeeded, "
        f"{c['failed']} failed, {c['cancelled']} cancelled"
    )
    return job


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
) -> None:
    """Show a job's status, counts, rate and ETA."""
    with _client() as client:
        job = _run(client.job, job_id)
    if as_json:
        out.print_json(json.dumps(job))
        return
    c, t = job["counts"], job["tokens"]
    table = Table(show_header=False, box=None)
    for key, value in (
        ("id", job["id"]),
        ("status", job["status"]),
        ("task", job["task"]),
        ("model", job["model"]),
        (
            "progress",
            f"{job['percent']}%  ({c['succeeded']} ok, {c['failed']} failed, "
            f"{c['cancelled']} cancelled of {c['total']})",
        ),
        ("tokens", f"{t['prompt']} prompt, {t['completion']} completion"),
        ("rate", f"{job['documents_per_s']} docs/s" if job["documents_per_s"] else "-"),
        ("eta", f"{job['eta_s']} s" if job["eta_s"] is not None else "-"),
        ("created", job["created_at"]),
        ("started", job["started_at"] or "-"),
        ("finished", job["finished_at"] or "-"),
        ("error", job["error"] or "-"),
    ):
        table.add_row(f"[bold]{key}[/]", str(value))
    out.print(table)


@app.command("jobs")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs with this status.")] = None,
    limit: Annotated[int, typer.Option(help="How many (newest first).")] = 20,
) -> None:
    """List your jobs, newest first."""
    with _client() as client:
        page = _run(client.jobs, status=status, limit=limit)
    table = Table("status", "task", "model", "done", "created")
    table.add_column("id", no_wrap=True)
    for job in page["data"]:
        c = job["counts"]
        done = c["succeeded"] + c["failed"] + c["cancelled"]
        table.add_row(
            job["status"],
            job["task"],
            job["model"],
            f"{done}/{c['total']}",
            job["created_at"][:19],
            job["id"],
        )
    out.print(table)


@app.command()
def results(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File (default: stdout).")
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="csv | jsonl (default: from -o).")
    ] = None,
    table: Annotated[
        bool, typer.Option("--table", help="Print the results as a table instead.")
    ] = False,
    limit: Annotated[int, typer.Option(help="With --table: at most this many rows.")] = 50,
) -> None:
    """Download a job's results (what is done so far while it runs)."""
    if table:
        _results_table(job_id, limit)
        return
    if fmt is None:
        fmt = "jsonl" if output is not None and output.suffix in (".jsonl", ".ndjson") else "csv"
    if fmt not in ("csv", "jsonl"):
        _fail(f"unknown format {fmt!r}; expected csv or jsonl")
    with _client() as client:
        try:
            if output is None:
                for piece in client.results(job_id, fmt):
                    sys.stdout.buffer.write(piece)
                sys.stdout.buffer.flush()
                return
            tmp = output.with_name(output.name + ".part")
            written = 0
            with (
                Progress(
                    TextColumn("downloading"),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    console=err,
                    transient=True,
                ) as progress,
                tmp.open("wb") as f,
            ):
                bar = progress.add_task("results", total=None)
                for piece in client.results(job_id, fmt):
                    f.write(piece)
                    written += len(piece)
                    progress.update(bar, completed=written)
            tmp.replace(output)
        except ApiError as exc:
            _fail(exc.message)
    err.print(f"wrote {written} bytes to {output}")


def _results_table(job_id: str, limit: int) -> None:
    with _client() as client:
        try:
            body = b"".join(client.results(job_id, "jsonl"))
        except ApiError as exc:
            _fail(exc.message)
    rows = [json.loads(line) for line in body.splitlines()]
    table = Table("id", "output", "label", "confidence", "error", show_lines=True)
    for r in rows[:limit]:
        conf = f"{r['confidence']:.2f}" if r["confidence"] is not None else ""
        table.add_row(
            r["id"], (r["output"] or "").strip(), r["label"] or "", conf, r["error"] or ""
        )
    out.print(table)
    if len(rows) > limit:
        err.print(f"(first {limit} of {len(rows)} rows)")


@app.command()
def models() -> None:
    """Models served by live workers, and those workers."""
    with _client() as client:
        page = _run(client.models)
    table = Table("model", "worker", "device", "last heartbeat")
    for m in page["data"]:
        for w in m["workers"]:
            table.add_row(m["id"], w["name"], w["device"], w["last_heartbeat_at"][:19])
    out.print(table)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Cancel a job: queued chunks never start; results so far are kept."""
    with _client() as client:
        job = _run(client.cancel, job_id)
    out.print(f"job {job['id']} {job['status']}")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return url


if __name__ == "__main__":  # pragma: no cover
    app()
