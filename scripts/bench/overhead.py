"""Orchestration overhead: documents/s end to end with a zero-cost engine, against a naive
Celery design (one task per document), on the same machine in one run.

  docqueue: ``POST /v1/jobs`` (a real API) of N documents, Redis, one real ``docqueue worker``
            running the *benchmark engine* (``DOCQUEUE_ENGINE=bench``: answers every prompt at
            once; never the default), results written to Postgres, until the job is
            ``completed``. Clock: from the start of the upload to the job's ``finished_at``.
  naive:    what a user would otherwise write, defined in this file only: the producer
            bulk-loads the documents (``COPY``, generous to it) and sends one Celery task per
            document; a stock prefork worker (one process per core) reads the document, makes
            the same zero-cost "output" and inserts one result row per task. Clock: from the
            start of the load to the last result's commit.

    .venv/bin/python scripts/bench/overhead.py                     # 1,000,000 docs; naive 20,000
    .venv/bin/python scripts/bench/overhead.py --docs 100000 --naive-docs 2000

Exits non-zero unless docqueue's best job reaches 25,000 documents/s and 10x the naive design.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_DOCS_PER_S = 25_000  # issue 14: a 1,000,000-document job, PostgreSQL included
TARGET_RATIO = 10.0
BENCH_MODEL = "bench-zero-cost"
NAIVE_QUEUE = "naive.per-document"

# ------------------------------------------------------------- the naive design (this file)

try:  # importable by the naive Celery worker: `celery -A overhead:naive_app worker`
    from celery import Celery

    naive_app = Celery("naive", broker=os.environ.get("NAIVE_BROKER", "redis://127.0.0.1:6379/14"))
    naive_app.conf.update(
        task_ignore_result=True,
        task_default_queue=NAIVE_QUEUE,
        worker_hijack_root_logger=False,
    )
    _conn: Any = None

    @naive_app.task(name="naive.process_document")
    def process_document(doc_id: int) -> None:
        """One document: read it, "generate" (zero cost, as the bench engine), write its row."""
        import psycopg

        global _conn
        if _conn is None:
            _conn = psycopg.connect(os.environ["NAIVE_DSN"], autocommit=True)
        text = _conn.execute("SELECT text FROM naive_docs WHERE id = %s", (doc_id,)).fetchone()[0]
        output = "ok" if text else ""
        _conn.execute(
            "INSERT INTO naive_results (doc_id, output) VALUES (%s, %s) "
            "ON CONFLICT (doc_id) DO NOTHING",
            (doc_id, output),
        )
except ImportError:  # pragma: no cover - celery is a dependency
    pass


def documents(n: int) -> list[str]:
    return [
        f"Document {i}: a short text about item {i % 97} and order {i * 7 % 1013}."
        for i in range(n)
    ]


def run_naive(ingest: Any, ctx: Any, texts: list[str], workdir: Path) -> tuple[float, int]:
    import psycopg

    with psycopg.connect(ctx.pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE naive_docs (id int PRIMARY KEY, text text NOT NULL)")
        conn.execute(
            "CREATE TABLE naive_results (doc_id int PRIMARY KEY, output text, "
            "done_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
    env = {**os.environ, "NAIVE_DSN": ctx.pg_dsn, "NAIVE_BROKER": ctx.redis_url}
    log = (workdir / "naive-worker.log").open("ab")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "--workdir",
            str(Path(__file__).parent),
            "-A",
            "overhead:naive_app",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(os.cpu_count() or 2),
            "--queues",
            NAIVE_QUEUE,
            "--loglevel",
            "warning",
            "--without-gossip",
            "--without-mingle",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        time.sleep(8)  # the worker is up and idle before the clock starts
        naive_app.conf.broker_url = ctx.redis_url
        started = time.time()
        with psycopg.connect(ctx.pg_dsn, autocommit=True) as conn:
            with conn.cursor().copy("COPY naive_docs (id, text) FROM STDIN") as copy:
                for i, t in enumerate(texts):
                    copy.write_row((i, t))
            with naive_app.producer_or_acquire() as producer:
                for i in range(len(texts)):
                    process_document.apply_async((i,), producer=producer)
            deadline = time.monotonic() + 3600
            while True:
                row = conn.execute("SELECT count(*) FROM naive_results").fetchone()
                assert row is not None
                done = row[0]
                if done >= len(texts) or time.monotonic() > deadline:
                    break
                if worker.poll() is not None:
                    raise RuntimeError(f"naive worker exited; see {workdir / 'naive-worker.log'}")
                time.sleep(0.5)
            row = conn.execute("SELECT max(done_at) FROM naive_results").fetchone()
            assert row is not None
            last = row[0]
        return last.timestamp() - started, int(done)
    finally:
        ingest.stop_group(worker, timeout_s=30)
        log.close()


# ------------------------------------------------------------------------------ docqueue


def run_docqueue(
    ingest: Any, ctx: Any, texts: list[str], chunk_size: int | None, workdir: Path, runs: int
) -> list[tuple[float, int, dict[str, float]]]:
    import httpx

    api = ingest.Api(ingest.free_port(), ctx.database_url, ctx.redis_url, workdir / "api.log")
    env = {
        **os.environ,
        "DOCQUEUE_DATABASE_URL": ctx.database_url,
        "DOCQUEUE_REDIS_URL": ctx.redis_url,
        "DOCQUEUE_ENGINE": "bench",  # the zero-cost benchmark engine, named as such
        "DOCQUEUE_LOG_LEVEL": "WARNING",
    }
    worker = ingest.start_worker(BENCH_MODEL, env, workdir / "worker.log")
    out = []
    try:
        ingest.wait_worker_ready(ctx.pg_dsn, BENCH_MODEL, [worker], workdir / "worker.log", 120)
        buf = io.StringIO()
        csv.writer(buf).writerows([["text"], *[[t] for t in texts]])
        body = buf.getvalue().encode()
        headers = {"Authorization": f"Bearer {ctx.key}"}
        meter_pids = {"worker": worker.pid, "api": api.proc.pid}
        for _ in range(runs):
            cpu0 = _cpu(ingest, meter_pids)
            started = time.time()
            resp = httpx.post(
                f"{api.base_url}/v1/jobs",
                headers=headers,
                data={
                    "task": "generate",
                    "model": BENCH_MODEL,
                    **({} if chunk_size is None else {"chunk_size": str(chunk_size)}),
                },
                files={"file": ("docs.csv", body, "text/csv")},
                timeout=300,
            )
            resp.raise_for_status()
            accepted = time.time()  # the upload is ingested and the job queued
            job_id = resp.json()["id"]
            while True:
                job = httpx.get(f"{api.base_url}/v1/jobs/{job_id}", headers=headers).json()
                if job["status"] in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.5)
            if job["status"] != "completed" or job["counts"]["succeeded"] != len(texts):
                raise RuntimeError(f"docqueue job did not complete cleanly: {job}")
            finished = datetime.fromisoformat(job["finished_at"]).timestamp()
            cpu = {k: v1 - cpu0[k] for k, v1 in _cpu(ingest, meter_pids).items()}
            cpu["ingest_s"] = accepted - started
            cpu["chunks"] = float(job["chunks"])
            out.append((finished - started, len(texts), cpu))
        return out
    finally:
        ingest.stop_group(worker, timeout_s=30)
        api.stop()


def _cpu(ingest: Any, pids: dict[str, int]) -> dict[str, float]:
    s = {name: ingest.tree_cpu_s(pid) for name, pid in pids.items()}
    s["postgres"] = ingest.postgres_cpu_s() or 0.0
    s["machine"] = ingest.system_busy_s()
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000_000, help="documents in the docqueue job")
    p.add_argument("--naive-docs", type=int, default=20_000, help="documents for the naive design")
    p.add_argument(
        "--chunk-size", type=int, default=None, help="default: none sent (the service's choice)"
    )
    p.add_argument("--runs", type=int, default=2, help="docqueue jobs in a row; the best counts")
    args = p.parse_args(argv)

    from scripts.bench import ingest

    ctx = ingest.local_context()
    ingest.create_database(ctx)
    try:
        with tempfile.TemporaryDirectory(prefix="docqueue-overhead-") as tmp:
            work = Path(tmp)
            size = args.chunk_size or "auto"
            print(f"docqueue: {args.docs:,} documents, bench engine, chunk {size} ...")
            dq = run_docqueue(ingest, ctx, documents(args.docs), args.chunk_size, work, args.runs)
            print(f"naive: one Celery task per document, {args.naive_docs:,} documents ...")
            naive_s, naive_n = run_naive(ingest, ctx, documents(args.naive_docs), work)
    finally:
        ingest.cleanup(ctx)

    print()
    print("zero-cost engine (docqueue: DOCQUEUE_ENGINE=bench); wall clock from submit to done")
    print(f"{'':44} {'docs':>8} {'seconds':>8} {'docs/s':>9}")
    for n, (secs, docs, _) in enumerate(dq, 1):
        print(
            f"{f'docqueue, job {n} (API, Redis, worker, PG)':44} {docs:8,} {secs:8.2f} "
            f"{docs / secs:9,.0f}"
        )
    print(
        f"{'naive: Celery task per document':44} {naive_n:8,} {naive_s:8.2f} "
        f"{naive_n / naive_s:9,.0f}"
    )
    best_s, best_n, best_cpu = min(dq, key=lambda r: r[0] / r[1])
    rate, naive_rate = best_n / best_s, naive_n / naive_s
    procs = ("worker", "api", "postgres")
    other = best_cpu["machine"] - sum(best_cpu[k] for k in procs)
    print(
        "CPU seconds in the best docqueue job: "
        + ", ".join(f"{k} {best_cpu[k]:.2f}" for k in procs)
        + f", other {other:.2f} (machine {best_cpu['machine']:.2f} over {best_s:.2f} s wall)"
    )
    print(
        "per document: "
        + ", ".join(f"{k} {best_cpu[k] / best_n * 1e6:.1f} µs" for k in procs)
        + f"; upload and ingest {best_cpu['ingest_s']:.2f} s of the {best_s:.2f} s; "
        + f"{best_cpu['chunks']:,.0f} chunks"
    )
    ok = rate >= TARGET_DOCS_PER_S and rate / naive_rate >= TARGET_RATIO
    print(
        f"docqueue {rate:,.0f} docs/s (target >= {TARGET_DOCS_PER_S:,}); "
        f"{rate / naive_rate:.1f}x the naive design (target >= {TARGET_RATIO:.0f}x): "
        + ("PASS" if ok else "MISS")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
