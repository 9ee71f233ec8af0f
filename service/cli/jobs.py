"""The job commands: ``submit``, ``status``, ``jobs``, ``results``, ``models``, ``cancel``,
``retry`` and ``delete``.

They talk to the API over HTTP only (``service.cli.client``), so they run anywhere the API can be
reached, with nothing but an API key.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
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

from service.cli import options
from service.cli.client import Client
from service.cli.output import api_client, err, fail, out, print_json
from service.store.states import JobStatus

#: Merged into the root app; the order here is the order ``docqueue --help`` lists them.
app = typer.Typer()

#: Smaller uploads finish before a bar would be worth drawing.
UPLOAD_BAR_MIN_BYTES = 4 * 1024 * 1024


@app.command()
def submit(
    file: options.InputFile,
    task: options.Task = None,
    model: Annotated[
        str | None, typer.Option(help="Model name or path (default: server's).")
    ] = None,
    text_column: options.TextColumn = "text",
    id_column: options.IdColumn = None,
    prompt: options.Prompt = None,
    labels: options.Labels = None,
    max_tokens: options.MaxTokens = None,
    temperature: options.Temperature = None,
    seed: options.Seed = None,
    chunk_size: options.ChunkSize = None,
    priority: Annotated[str, typer.Option(help="interactive | bulk")] = "interactive",
    delimiter: options.Delimiter = None,
    fmt: options.Format = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            help="Same key and same request: the same job; another request under a used key "
            "is refused."
        ),
    ] = None,
    summary_words: options.SummaryWords = None,
    language: options.Language = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the job with a progress bar.")
    ] = False,
    poll_s: Annotated[float, typer.Option(help="Seconds between polls with --wait.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
) -> None:
    """Submit FILE (CSV, JSON Lines or Parquet, sent as it is) as a job. An OpenAI batch file
    (JSON Lines of {custom_id, method, url, body}) becomes a batch, as the OpenAI SDK makes one:
    its requests carry their own model and parameters."""
    endpoint = batch_endpoint(file)
    if endpoint is not None:
        if task is not None:
            fail("FILE is an OpenAI batch file: its requests say what to do; drop --task")
        with api_client() as client:
            batch = _submit_batch(client, file, endpoint, as_json)
            if wait and _follow_batch(client, batch, poll_s)["status"] != "completed":
                raise typer.Exit(1)
        return
    if task is None:
        fail("--task is required (generate, summarize or classify) unless FILE is an OpenAI "
             "batch file")  # fmt: skip
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
        "format": fmt,
        "summary_words": summary_words,
        "language": language,
    }
    with api_client() as client:
        job = _upload(client, file, fields, idempotency_key)
        _print_submitted(job, as_json)
        # A job that did not complete is a failure for scripts that wait for it.
        if wait and _follow(client, job, poll_s)["status"] != "completed":
            raise typer.Exit(1)


def batch_endpoint(file: Path) -> str | None:
    """The endpoint of an OpenAI batch file (its first request's ``url``), or None when FILE
    is not one: its first non-blank line is a JSON object with ``custom_id``, ``method``,
    ``url`` and ``body``. Reads that line only (at most 1 MiB of it)."""
    if file.suffix.lower() not in (".jsonl", ".ndjson", ".json", ".txt", ""):
        return None
    with file.open("rb") as f:
        for raw in f:
            if len(raw) > 1 << 20:
                return None
            if not raw.strip():
                continue
            try:
                first = json.loads(raw)
            except ValueError:
                return None
            keys = {"custom_id", "method", "url", "body"}
            if isinstance(first, dict) and keys <= set(first) and isinstance(first["url"], str):
                return str(first["url"])
            return None
    return None


def _submit_batch(client: Client, file: Path, endpoint: str, as_json: bool) -> dict[str, Any]:
    uploaded = client.upload_file(file)
    batch = client.create_batch(
        {"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "24h"}
    )
    if as_json:
        print_json(batch)
    else:
        out.print(
            f"batch [bold]{batch['id']}[/] {batch['status']} (job {batch['job_id']}), "
            f"{endpoint}, file {uploaded['id']}; `docqueue results {batch['id']} --format "
            "openai` writes its output lines"
        )
    return batch


def _follow_batch(client: Client, batch: dict[str, Any], poll_s: float) -> dict[str, Any]:
    """Waits until the file is read, then follows the batch's job with the bar, then until
    its output files are written."""
    while batch["status"] == "validating":
        time.sleep(poll_s)
        batch = client.batch(batch["id"])
    if batch["status"] in ("in_progress", "cancelling"):
        _follow(client, client.job(batch["job_id"]), poll_s)
    while batch["status"] in ("in_progress", "finalizing", "cancelling"):
        time.sleep(poll_s)
        batch = client.batch(batch["id"])
    errors = (batch.get("errors") or {}).get("data") or []
    for e in errors[:20]:
        err.print(f"[red]line {e.get('line')}[/]: {e.get('message')}", highlight=False)
    out.print(f"batch {batch['id']} {batch['status']}")
    return batch


def _upload(
    client: Client, file: Path, fields: dict[str, Any], idempotency_key: str | None
) -> dict[str, Any]:
    """Posts the file, with a bar for large files (uploads of gigabytes take a while)."""
    size = file.stat().st_size
    with Progress(
        TextColumn("uploading {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
        disable=size < UPLOAD_BAR_MIN_BYTES,
    ) as progress:
        bar = progress.add_task(file.name, total=size)
        return client.submit(
            file,
            fields,
            idempotency_key=idempotency_key,
            on_upload=lambda n: progress.advance(bar, n),
        )


def _print_submitted(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(job)
        return
    if job.get("warning"):
        err.print(f"[yellow]warning:[/] {job['warning']}", highlight=False)
    counts = job["counts"]
    out.print(
        f"job [bold]{job['id']}[/] {job['status']}: {counts['total']} documents "
        f"in {job['chunks']} chunks, model {job['model']}"
    )


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
            rate = job.get("documents_per_s")
            eta = job.get("eta_s")
            progress.update(
                bar,
                completed=_done(c),
                status=job["status"],
                rate=f"{rate:,.1f}" if rate else "-",
                eta=f"{eta:,.0f}s" if eta is not None else "-",
            )
            if JobStatus(job["status"]).terminal:
                break
            time.sleep(poll_s)
            job = client.job(job["id"])
    c = job["counts"]
    style = "green" if job["status"] == "completed" else "red"
    out.print(
        f"job {job['id']} [{style}]{job['status']}[/]: {c['succeeded']} succeeded, "
        f"{c['failed']} failed, {c['cancelled']} cancelled"
    )
    return job


def _done(counts: dict[str, int]) -> int:
    """Documents that will not change any more, whatever their outcome."""
    return counts["succeeded"] + counts["failed"] + counts["cancelled"]


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
) -> None:
    """Show a job's status, counts, rate and ETA."""
    with api_client() as client:
        job = client.job(job_id)
    if as_json:
        print_json(job)
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
    # Only when set: a retry names its original, a deleted job says so.
    for key, value in (("retry of", job.get("retry_of")), ("deleted", job.get("deleted_at"))):
        if value:
            table.add_row(f"[bold]{key}[/]", str(value))
    out.print(table)


@app.command("jobs")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs with this status.")] = None,
    limit: Annotated[int, typer.Option(help="How many (newest first).")] = 20,
) -> None:
    """List your jobs, newest first."""
    with api_client() as client:
        page = client.jobs(status=status, limit=limit)
    table = Table("status", "task", "model", "done", "created")
    table.add_column("id", no_wrap=True)
    for job in page["data"]:
        c = job["counts"]
        table.add_row(
            # A deleted job stays listed (its counts), marked.
            f"{job['status']} (deleted)" if job.get("deleted_at") else job["status"],
            job["task"],
            job["model"],
            f"{_done(c)}/{c['total']}",
            job["created_at"][:19],
            job["id"],
        )
    out.print(table)


#: The result format an output file's extension implies.
_RESULT_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@app.command()
def results(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File (default: stdout).")
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="csv | jsonl | parquet (default: from -o's name); openai: a batch's lines.",
        ),
    ] = None,
    table: Annotated[
        bool, typer.Option("--table", help="Print the results as a table instead.")
    ] = False,
    limit: Annotated[int, typer.Option(help="With --table: at most this many rows.")] = 50,
) -> None:
    """Download a job's results (what is done so far while it runs). With a batch id and
    ``--format openai``: its output lines, then its error lines, as OpenAI writes them."""
    if table:
        _results_table(job_id, limit)
        return
    if fmt == "openai" or job_id.startswith("batch_"):
        _batch_results(job_id, output)
        return
    if fmt is None:
        fmt = _RESULT_SUFFIXES.get(output.suffix.lower(), "csv") if output is not None else "csv"
    if fmt not in ("csv", "jsonl", "parquet"):
        fail(f"unknown format {fmt!r}; expected csv, jsonl or parquet")
    if fmt == "parquet" and output is None and sys.stdout.isatty():
        fail("Parquet is binary: write it to a file (-o results.parquet) or a pipe")
    with api_client() as client:
        if output is None:
            _results_to_stdout(client, job_id, fmt)
            return
        written = _results_to_file(client, job_id, fmt, output)
    err.print(f"wrote {written} bytes to {output}")


def _batch_results(batch_id: str, output: Path | None) -> None:
    """A finished batch's output file, then its error file: one OpenAI line per request."""
    if not batch_id.startswith("batch_"):
        fail(f"--format openai takes a batch id (batch_...), not {batch_id!r}")
    with api_client() as client:
        batch = client.batch(batch_id)
        files = [f for f in (batch.get("output_file_id"), batch.get("error_file_id")) if f]
        if not files:
            fail(f"batch {batch_id} is {batch['status']}: its output is written when it ends")
        pieces = (piece for file_id in files for piece in client.file_content(file_id))
        if output is None:
            for piece in pieces:
                sys.stdout.buffer.write(piece)
            sys.stdout.buffer.flush()
            return
        tmp = output.with_name(output.name + ".part")
        with tmp.open("wb") as f:
            written = sum(f.write(piece) for piece in pieces)
        tmp.replace(output)
    err.print(f"wrote {written} bytes to {output}")


def _results_to_stdout(client: Client, job_id: str, fmt: str) -> None:
    """Raw bytes as the API streams them, so a pipe sees rows as they arrive."""
    for piece in client.results(job_id, fmt):
        sys.stdout.buffer.write(piece)
    sys.stdout.buffer.flush()


def _results_to_file(client: Client, job_id: str, fmt: str, output: Path) -> int:
    """Writes to ``OUTPUT.part`` and renames it, so OUTPUT is never a partial download."""
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
    return written


def _results_table(job_id: str, limit: int) -> None:
    with api_client() as client:
        body = b"".join(client.results(job_id, "jsonl"))
    print_results([json.loads(line) for line in body.splitlines()], limit)


def print_results(rows: list[dict[str, Any]], limit: int) -> None:
    """Results (download records) as a table, the first ``limit`` of them."""
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
    """Models served by live workers, and (with an admin key) those workers."""
    with api_client() as client:
        page = client.models()
    if all(m.get("workers") is None for m in page["data"]):  # a tenant key: names only
        table = Table("model", "ready")
        for m in page["data"]:
            table.add_row(m["id"], "yes" if m.get("ready") else "loading")
        out.print(table)
        return
    table = Table("model", "worker", "device", "last heartbeat")
    for m in page["data"]:
        for w in m["workers"] or []:
            table.add_row(m["id"], w["name"], w["device"], w["last_heartbeat_at"][:19])
    out.print(table)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Cancel a job: queued chunks never start; results so far are kept."""
    with api_client() as client:
        job = client.cancel(job_id)
    out.print(f"job {job['id']} {job['status']}")


@app.command()
def retry(
    job_id: Annotated[str, typer.Argument(help="Job id of a finished job.")],
    include_cancelled: Annotated[
        bool,
        typer.Option(
            "--include-cancelled", help="Also the rows that never ran (the job was cancelled)."
        ),
    ] = False,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Same key, same retry: the same job, not a second one.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the new job with a progress bar.")
    ] = False,
    poll_s: Annotated[float, typer.Option(help="Seconds between polls with --wait.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the new job as JSON.")] = False,
) -> None:
    """Run a finished job's failed rows again, as a new job; prints its id. Its results keep
    the original rows' ids, so they match the original's row for row."""
    with api_client() as client:
        job = client.retry(job_id, include_cancelled, idempotency_key)
        _print_submitted(job, as_json)
        if wait and _follow(client, job, poll_s)["status"] != "completed":
            raise typer.Exit(1)


@app.command()
def delete(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a job's documents and results, cancelling it first if it runs. Its counts stay
    (docqueue status JOB); its results cannot be downloaded any more."""
    if not yes:
        typer.confirm(
            f"Delete job {job_id}: its documents and results, for good?", abort=True, err=True
        )
    with api_client() as client:
        body = client.delete(job_id)
    job, c = body["job"], body["job"]["counts"]
    rows = "purged" if body["purge"] == "done" else "being purged"
    out.print(
        f"job {job['id']} deleted ({job['status']}: {c['succeeded']} succeeded, "
        f"{c['failed']} failed, {c['cancelled']} cancelled); its rows are {rows}"
    )
