"""``docqueue run``: a file in, results out, no server (issue 15).

The job is the service's: the same request checks (``service.jobs.validate``), the same readers
and per-row bounds (``service.jobs.formats``), the same chunk runner and engine
(``workers.embedded``), on the embedded store (``service.store.sqlite``) in a file next to the
output. Killed in any way, the same command continues where it stopped; a changed input or
changed options are refused unless ``--restart``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from service.cli import options
from service.cli.output import err, fail, out, with_engine
from service.errors import BadInputError, ConfigError, DocqueueError
from service.jobs import validate
from service.jobs.export import result_record, write_file
from service.jobs.formats import format_of_name
from service.jobs.ingest import IngestOptions
from service.settings import Settings, get_settings
from service.store.states import JobStatus

app = typer.Typer()

#: What identifies a run's input and options in its store; any change is refused.
_FINGERPRINT = "fingerprint"
_JOB = "job_id"


@app.command()
def run(
    file: options.InputFile,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Results file: .csv, .jsonl or .parquet.")
    ],
    task: options.Task = None,
    model: Annotated[
        str | None, typer.Option(help="Model name or path (default: DOCQUEUE_DEFAULT_MODEL).")
    ] = None,
    text_column: options.TextColumn = "text",
    id_column: options.IdColumn = None,
    prompt: options.Prompt = None,
    labels: options.Labels = None,
    max_tokens: options.MaxTokens = None,
    temperature: options.Temperature = None,
    seed: options.Seed = None,
    chunk_size: options.ChunkSize = None,
    delimiter: options.Delimiter = None,
    fmt: options.Format = None,
    summary_words: options.SummaryWords = None,
    language: options.Language = None,
    store: Annotated[
        Path | None,
        typer.Option(help="The run's state (SQLite); default: OUTPUT.docqueue.sqlite."),
    ] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Start over: discard the store's earlier run.")
    ] = False,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Chunks in flight (default: DOCQUEUE_WORKER_CONCURRENCY).", min=1),
    ] = None,
    table: Annotated[
        bool, typer.Option("--table", help="Also print the results as a table (first 50).")
    ] = False,
    engine: options.Engine = None,
) -> None:
    """Run FILE (CSV, JSON Lines or Parquet) through the model in this process and write the
    results to OUTPUT, in input order. No server: the state is a SQLite file next to OUTPUT,
    and the same command after Ctrl-C, kill -9 or a power cut continues where it stopped.

    An OpenAI batch file (JSON Lines of {custom_id, method, url, body}) runs its requests as
    they are, as the Batch API would, and OUTPUT (.jsonl) gets OpenAI's output lines; the
    requests that failed go to OUTPUT's name with .errors.jsonl."""
    from service.cli.jobs import batch_endpoint

    settings = with_engine(get_settings(), engine)
    endpoint = batch_endpoint(file)
    if endpoint is not None and task is not None:
        fail("FILE is an OpenAI batch file: its requests say what to do; drop --task")
    if endpoint is None and task is None:
        fail("--task is required (generate, summarize or classify) unless FILE is an OpenAI "
             "batch file")  # fmt: skip
    out_fmt = format_of_name(output.name)
    if out_fmt is None or (endpoint is not None and out_fmt != "jsonl"):
        fail(
            f"--output {output.name!r}: name it "
            + ("something .jsonl (OpenAI output lines)" if endpoint else ".csv, .jsonl or .parquet")
        )
    req = validate.JobRequest(
        task=(task or "generate").strip().lower(),
        model=(model or settings.jobs.default_model).strip(),
        text_column=text_column,
        id_column=id_column,
        prompt=prompt,
        labels=validate.parse_labels(labels),
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        chunk_size=chunk_size,
        delimiter=delimiter,
        format=fmt,
        source_name=file.name,
        extra_params={
            k: v for k, v in {"summary_words": summary_words, "language": language}.items() if v
        },
    )
    try:
        req.capabilities = _capabilities(req.model, settings)
        validate.validate(req, settings)
    except (BadInputError, ConfigError) as exc:
        fail(exc.message)
    store_path = store or output.with_name(output.name + ".docqueue.sqlite")
    if endpoint is not None:
        req.extra_params = {"endpoint": endpoint, "model": model}
    try:
        _run(req, file, output, out_fmt, store_path, restart, concurrency, settings, table)
    except DocqueueError as exc:
        fail(str(exc))


def _capabilities(model: str, settings: Settings) -> validate.ModelCapabilities | None:
    """What the engine will make of the model, from its config alone (nothing is loaded yet):
    a sequence classifier classifies only, with its labels, on the transformers engine, and
    the vllm engine refuses it."""
    from workers.engines import model_config, refuse_classifier

    if settings.engine.kind == "vllm":
        refuse_classifier(model)
    if settings.engine.kind != "transformers":
        return None
    from workers.engines.transformers_engine import capabilities_of

    config = model_config(model)
    return None if config is None else capabilities_of(config)


def _fingerprint(req: validate.JobRequest, file: Path) -> str:
    """The input's bytes and every option that shapes the results."""
    h = hashlib.sha256()
    with file.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    options = {k: v for k, v in vars(req).items() if k != "source_name"}
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _run(
    req: validate.JobRequest,
    file: Path,
    output: Path,
    out_fmt: Any,
    store_path: Path,
    restart: bool,
    concurrency: int | None,
    settings: Settings,
    table: bool,
) -> None:
    from service.store.sqlite import SqliteChunkStore
    from workers import embedded

    fingerprint = _fingerprint(req, file)
    with embedded.exclusive(store_path):
        if restart:
            for suffix in ("", "-wal", "-shm"):
                store_path.with_name(store_path.name + suffix).unlink(missing_ok=True)
        db = SqliteChunkStore(
            store_path, lease_s=settings.worker.lease_s, max_attempts=settings.worker.max_attempts
        )
        job_id = _job(db, req, file, fingerprint, settings)
        err.print(f"state: {store_path}")
        job = db.job(job_id)
        rt = None
        if not JobStatus(job["status"]).terminal:
            concurrency = concurrency or settings.worker.concurrency
            rt = _work(db, job_id, str(job["model"]), concurrency, settings)
        try:
            _write(db, job_id, output, out_fmt, table)
        finally:
            if rt is not None:  # after the output: an engine takes seconds to stop
                rt.shutdown()
        db.close_file()


def _job(
    db: Any, req: validate.JobRequest, file: Path, fingerprint: str, settings: Settings
) -> Any:
    """The store's job: made now from FILE, or the earlier run's if its input and options are
    the same (else refused: its rows would mix two runs)."""
    import uuid

    from service.jobs.formats import ingest_upload

    earlier = db.meta(_JOB)
    if earlier is not None:
        if db.meta(_FINGERPRINT) != fingerprint:
            fail(
                f"{db.path} holds a run of another input or other options; run with the same "
                "ones to continue it, or add --restart to start over"
            )
        err.print("continuing the earlier run")
        return uuid.UUID(earlier)
    endpoint = req.extra_params.get("endpoint")
    if endpoint is not None:
        return _batch_job(db, req, file, fingerprint, settings)
    opts = IngestOptions.from_settings(
        settings,
        text_column=req.text_column,
        id_column=req.id_column,
        delimiter=req.delimiter,
        template_fields=validate.template_fields(req.prompt) if req.prompt else frozenset(),
        format=req.format,
        file_name=file.name,
    )

    def load(sink: Any) -> Any:
        with file.open("rb") as fh:
            return ingest_upload(sink, fh, fh, opts)

    job_id = db.create_job(
        task=req.task,
        model=req.model,
        params=validate.job_params(req),
        load=load,
        chunk_size=req.chunk_size or (lambda rows: validate.auto_chunk_size(rows, settings)),
    )
    db.set_meta({_JOB: str(job_id), _FINGERPRINT: fingerprint, "input": str(file.resolve())})
    return job_id


def _batch_job(
    db: Any, req: validate.JobRequest, file: Path, fingerprint: str, settings: Settings
) -> Any:
    """An OpenAI batch file's requests as the job's rows, checked as ``POST /v1/batches``
    checks them (a faulty file is refused naming its lines). Its model is the one its lines
    name (through ``DOCQUEUE_MODEL_ALIASES``), or ``--model``."""
    from service.batches.requests import ENDPOINTS, display_text, parse_lines

    endpoint = str(req.extra_params["endpoint"])
    if endpoint not in ENDPOINTS:
        fail(f"endpoint {endpoint[:100]!r} is not supported; expected one of: "
             + ", ".join(ENDPOINTS))  # fmt: skip
    limit = min(settings.openai.batch_max_requests, settings.jobs.max_rows_per_job)
    with file.open("rb") as fh:
        parsed = parse_lines(
            fh,
            endpoint,
            max_requests=limit,
            max_line_bytes=settings.openai.batch_max_line_bytes,
        )
    if not parsed.ok:
        shown = "; ".join(f"line {e.line}: {e.message}" for e in parsed.errors[:10])
        more = f" (and {len(parsed.errors) - 10} more)" if len(parsed.errors) > 10 else ""
        fail(f"{file.name} is not a valid batch file: {shown}{more}")
    if not parsed.requests or parsed.model is None:
        fail(f"{file.name} holds no requests")
    given = req.extra_params.get("model")
    model = str(given) if given else settings.openai.resolve_model(parsed.model)

    def load(sink: Any) -> None:
        for n, r in enumerate(parsed.requests, 1):
            body = json.dumps({"body": dict(r.raw_body)})
            sink.add(n, r.custom_id, display_text(r.raw_body), body, r.line)

    job_id = db.create_job(
        task=ENDPOINTS[endpoint],
        model=model,
        params={"default_max_tokens": settings.openai.batch_default_max_tokens},
        load=load,
        chunk_size=lambda rows: validate.auto_chunk_size(rows, settings),
    )
    db.set_meta(
        {
            _JOB: str(job_id),
            _FINGERPRINT: fingerprint,
            "input": str(file.resolve()),
            "endpoint": endpoint,
            "asked_model": parsed.model,
        }
    )
    return job_id


def _work(db: Any, job_id: Any, model: str, concurrency: int, settings: Settings) -> Any:
    """Runs the job to its end with the engine in this process; returns the ``Runtime``, still
    up, for the caller to shut down once the output is written."""
    from workers import embedded
    from workers.engines import engine_for
    from workers.runtime import Runtime

    embedded.start_reaper()
    embedded.install_sigterm()
    err.print(f"starting the {settings.engine.kind} engine for {model} ...")
    engine = engine_for(settings, model)
    rt = Runtime(
        settings=settings,
        model=model,
        name=f"run@{socket.gethostname()}",
        engine=engine,
        db=None,
        store=db,
        slots=concurrency,
    )
    rt.start()
    stop = threading.Event()
    result: list[Any] = []
    runner = threading.Thread(
        target=lambda: result.append(
            embedded.run_job(rt, db, job_id, concurrency=concurrency, stop=stop)
        ),
        name="docqueue-run",
        daemon=True,
    )
    try:
        runner.start()
        _follow(db, job_id, runner)
    except KeyboardInterrupt:
        stop.set()
        err.print("interrupted: what finished is kept; run the same command to continue")
        rt.shutdown()
        raise typer.Exit(130) from None
    outcome = result[0] if result else None
    if outcome is None or outcome.stopped is not None:
        rt.shutdown()
        why = "stopped" if outcome is None else outcome.stopped
        fail(f"the run stopped: {why}; what finished is kept, run the same command to continue")
    return rt


def _follow(db: Any, job_id: Any, runner: threading.Thread) -> None:
    """A progress bar over the store's counters until the runner thread ends."""
    job = db.job(job_id)
    total = int(job["total"])
    started = time.monotonic()
    base_done = int(job["succeeded"]) + int(job["failed"]) + int(job["cancelled"])
    base_tokens = int(job["completion_tokens"])
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    ) as bar:
        task = bar.add_task("documents", total=total, completed=base_done, rate="")
        while True:
            runner.join(0.5)
            job = db.job(job_id)
            done = int(job["succeeded"]) + int(job["failed"]) + int(job["cancelled"])
            secs = max(time.monotonic() - started, 1e-9)
            docs_s = (done - base_done) / secs
            toks_s = (int(job["completion_tokens"]) - base_tokens) / secs
            bar.update(task, completed=done, rate=f"{docs_s:,.1f} docs/s {toks_s:,.0f} tok/s")
            if not runner.is_alive():
                return


def _write(db: Any, job_id: Any, output: Path, out_fmt: Any, table: bool) -> None:
    job = db.job(job_id)
    if db.meta("endpoint") is not None:
        _write_openai(db, job_id, output)
        return
    records = (result_record(d.external_id, d.idx, r) for d, r in db.rows(job_id) if r)
    rows = write_file(records, out_fmt, output)
    if table:
        from service.cli.jobs import print_results

        first = (result_record(d.external_id, d.idx, r) for d, r in db.rows(job_id, 50) if r)
        print_results([rec for rec, _ in zip(first, range(50), strict=False)], 50)
    failed = int(job["failed"])
    out.print(
        f"{job['status']}: {rows} rows in {output} ({job['succeeded']} succeeded, {failed} "
        f"failed, {job['cancelled']} cancelled; {job['completion_tokens']} output tokens)"
    )
    if failed:
        out.print(f"the failed rows have their reason in the 'error' column of {output}")
    if job["status"] != JobStatus.COMPLETED:
        raise typer.Exit(1)


def _write_openai(db: Any, job_id: Any, output: Path) -> None:
    """OpenAI's output lines for the requests that succeeded, in OUTPUT, and its error lines
    for the rest in OUTPUT's name with .errors.jsonl: the lines a finalized batch's two files
    hold (``service.batches.lines.render``), in input order."""
    from types import SimpleNamespace

    from service.batches.lines import render
    from service.batches.requests import ENDPOINTS

    job = db.job(job_id)
    kind = ENDPOINTS[str(db.meta("endpoint"))]
    model = str(db.meta("asked_model") or job["model"])
    status = "completed" if job["status"] == JobStatus.COMPLETED else "cancelled"
    errors_path = output.with_name(output.name.removesuffix(".jsonl") + ".errors.jsonl")
    counts = [0, 0]
    tmp = [p.with_name(f".{p.name}.partial") for p in (output, errors_path)]
    try:
        with (
            tmp[0].open("w", encoding="utf-8") as ok_fh,
            tmp[1].open("w", encoding="utf-8") as bad_fh,
        ):
            for doc, r in db.rows(job_id):
                body = (doc.extra or {}).get("body") or {}
                prompt = body.get("prompt")
                prompt = prompt[0] if isinstance(prompt, list) and prompt else prompt
                row = SimpleNamespace(
                    idx=doc.idx,
                    custom_id=doc.external_id,
                    has_result=r is not None,
                    body=body if r is not None and r["error"] is not None else None,
                    prompt_chars=len(prompt) if isinstance(prompt, str) else None,
                    **_result_fields(r),
                )
                line, ok = render(row, job_id, kind, model, status)  # type: ignore[arg-type]
                (ok_fh if ok else bad_fh).write(line.model_dump_json() + "\n")
                counts[0 if ok else 1] += 1
    except BaseException:
        for t in tmp:
            t.unlink(missing_ok=True)
        raise
    os.replace(tmp[0], output)
    if counts[1]:
        os.replace(tmp[1], errors_path)
    else:
        tmp[1].unlink()
        errors_path.unlink(missing_ok=True)
    out.print(
        f"{job['status']}: {counts[0]} output lines in {output}"
        + (f", {counts[1]} error lines in {errors_path}" if counts[1] else "")
        + f" ({job['completion_tokens']} output tokens)"
    )
    if job["status"] != JobStatus.COMPLETED:
        raise typer.Exit(1)


def _result_fields(r: dict[str, Any] | None) -> dict[str, Any]:
    """A stored result as the line renderer reads it (the finalizer's SQL row's columns)."""
    from datetime import UTC, datetime

    if r is None:
        return {"error": None}
    return {
        "output": r["output"],
        "finish_reason": r["finish_reason"],
        "error": r["error"],
        "prompt_tokens": r["prompt_tokens"],
        "completion_tokens": r["completion_tokens"],
        "choices": None if r["choices"] is None else json.loads(r["choices"]),
        "created_at": datetime.fromtimestamp(r["created_at"], UTC),
    }
