"""Export benchmark: ``GET /v1/jobs/{id}/results`` of a real API process for 1,000,000 rows.

Creates a throw-away database and a job through the real API (a generated CSV upload), then
fills its results with one SQL statement (as if workers had written them: a summary-like
output, tokens, some classify labels and some row errors) and marks the job completed. It then
downloads the results as CSV and as JSONL, streaming, and prints rows/s, MiB/s and the API's
resident memory (baseline before, peak during). A smaller job is measured the same way, so
"flat memory" shows as the two peaks side by side. Cleans up afterwards.

    .venv/bin/python scripts/bench/export.py                   # 1,000,000 rows (and 100,000)
    .venv/bin/python scripts/bench/export.py --rows 200000 --small-rows 0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_ROWS_PER_S = 100_000
MiB = 1024 * 1024


@dataclass
class Download:
    rows: int
    fmt: str
    seconds: float
    bytes: int
    rss_base: int
    rss_peak: int
    api_cpu_s: float
    pg_cpu_s: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def make_job(ingest: Any, ctx: Any, api: Any, rows: int, workdir: Path) -> str:
    """A job of ``rows`` documents through the real upload, then its results written in SQL."""
    import httpx
    import psycopg

    path = workdir / f"docs-{rows}.csv"
    ingest.generate_csv(path, rows, 60)
    with path.open("rb") as f:
        resp = httpx.post(
            f"{api.base_url}/v1/jobs",
            headers={"Authorization": f"Bearer {ctx.key}"},
            data={"task": "summarize", "model": "bench-export", "id_column": "id"},
            files={"file": ("docs.csv", f, "text/csv")},
            timeout=600,
        )
    resp.raise_for_status()
    job_id = str(resp.json()["id"])
    with psycopg.connect(ctx.pg_dsn, autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO results (job_id, idx, output, label, confidence, finish_reason,
                                 prompt_tokens, completion_tokens, truncated, error, attempts,
                                 latency_ms)
            SELECT %(j)s, g,
                   CASE WHEN g %% 100 = 42 THEN NULL
                        ELSE 'Summary of document ' || g || ': the team reports "steady" '
                             || 'progress, with item ' || (g %% 97) || ', on schedule.' END,
                   CASE WHEN g %% 3 = 0 THEN 'positive' END,
                   CASE WHEN g %% 3 = 0 THEN 0.9 END,
                   CASE WHEN g %% 100 = 42 THEN NULL ELSE 'stop' END,
                   40 + g %% 50, 20 + g %% 30, g %% 1000 = 0,
                   CASE WHEN g %% 100 = 42 THEN 'engine rejected the prompt: too long' END,
                   1, 12.5
            FROM generate_series(1, %(n)s) AS g  -- document idx is the 1-based data row
            """,
            {"j": job_id, "n": rows},
        )
        conn.execute("UPDATE chunks SET state = 'done' WHERE job_id = %(j)s", {"j": job_id})
        conn.execute(
            "UPDATE jobs SET status = 'completed', succeeded = %(ok)s, failed = %(bad)s, "
            "started_at = now(), finished_at = now() WHERE id = %(j)s",
            {"j": job_id, "ok": rows - rows // 100, "bad": rows // 100},
        )
        conn.execute("VACUUM ANALYZE results")
    return job_id


def download(ingest: Any, ctx: Any, api: Any, job_id: str, rows: int, fmt: str) -> Download:
    import httpx

    pid = api.proc.pid
    base = ingest.tree_rss_bytes(pid)
    cpu0, pg0 = ingest.tree_cpu_s(pid), ingest.postgres_cpu_s() or 0.0
    lines = nbytes = 0
    with ingest.RssSampler(pid) as rss:
        started = time.perf_counter()
        with httpx.stream(
            "GET",
            f"{api.base_url}/v1/jobs/{job_id}/results",
            params={"format": fmt},
            headers={"Authorization": f"Bearer {ctx.key}"},
            timeout=600,
        ) as resp:
            resp.raise_for_status()
            for chunk in resp.iter_raw(1 << 20):
                nbytes += len(chunk)
                lines += chunk.count(b"\n")
        seconds = time.perf_counter() - started
    got = lines - (1 if fmt == "csv" else 0)  # the CSV header
    if got != rows:  # no embedded newlines in these outputs: one line per row
        raise RuntimeError(f"{fmt}: expected {rows} rows, got {got}")
    return Download(
        rows=rows,
        fmt=fmt,
        seconds=seconds,
        bytes=nbytes,
        rss_base=base,
        rss_peak=rss.peak,
        api_cpu_s=ingest.tree_cpu_s(pid) - cpu0,
        pg_cpu_s=(ingest.postgres_cpu_s() or 0.0) - pg0,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--small-rows", type=int, default=100_000, help="0: skip the small job")
    args = p.parse_args(argv)

    from scripts.bench import ingest

    ctx = ingest.local_context()
    ingest.create_database(ctx)
    sizes = [n for n in (args.small_rows, args.rows) if n]
    results: list[Download] = []
    try:
        with tempfile.TemporaryDirectory(prefix="docqueue-export-") as tmp:
            work = Path(tmp)
            setup = ingest.Api(ingest.free_port(), ctx.database_url, ctx.redis_url, work / "a.log")
            try:
                jobs = {}
                for n in sizes:
                    print(f"preparing a completed job with {n:,} results ...", flush=True)
                    jobs[n] = make_job(ingest, ctx, setup, n, work)
            finally:
                setup.stop()
            for n in sizes:
                for fmt in ("csv", "jsonl"):
                    # A fresh API process per download: its peak is then this download's alone.
                    api = ingest.Api(
                        ingest.free_port(), ctx.database_url, ctx.redis_url, work / "api.log"
                    )
                    try:
                        import httpx

                        httpx.get(  # warm-up: the first request opens the database pool
                            f"{api.base_url}/v1/jobs/{jobs[n]}",
                            headers={"Authorization": f"Bearer {ctx.key}"},
                        ).raise_for_status()
                        results.append(download(ingest, ctx, api, jobs[n], n, fmt))
                        r = results[-1]
                        print(f"  {n:,} rows as {fmt}: {r.rows_per_s:,.0f} rows/s", flush=True)
                    finally:
                        api.stop()
    finally:
        ingest.cleanup(ctx)

    print()
    print(
        f"{'rows':>10} {'format':>6} {'seconds':>8} {'rows/s':>9} {'MiB/s':>7} "
        f"{'RSS base':>9} {'RSS peak':>9} {'API cpu':>8} {'PG cpu':>7}"
    )
    for r in results:
        print(
            f"{r.rows:>10,} {r.fmt:>6} {r.seconds:>8.2f} {r.rows_per_s:>9,.0f} "
            f"{r.bytes / MiB / r.seconds:>7.1f} {r.rss_base / MiB:>9.1f} {r.rss_peak / MiB:>9.1f} "
            f"{r.api_cpu_s:>8.2f} {r.pg_cpu_s:>7.2f}"
        )
    print("RSS in MiB of the API process; CPU seconds during the download.")
    big = [r for r in results if r.rows == max(sizes)]
    worst = min(r.rows_per_s for r in big)
    ok = worst >= TARGET_ROWS_PER_S
    print(
        f"export: {worst:,.0f} rows/s at {max(sizes):,} rows, slowest format "
        f"(target >= {TARGET_ROWS_PER_S:,}): " + ("PASS" if ok else "MISS")
    )
    if len(sizes) > 1:
        for fmt in ("csv", "jsonl"):
            peaks = [f"{r.rss_peak / MiB:.1f}" for r in results if r.fmt == fmt]
            print(f"memory ({fmt}): API peak RSS {' -> '.join(peaks)} MiB for {sizes} rows")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
