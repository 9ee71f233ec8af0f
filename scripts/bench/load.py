"""Load benchmark: many clients submitting and polling one real ``docqueue api``, as users do.

Starts ``docqueue api`` with its defaults on a throw-away database, then a load client in its own
process: each of ``--clients`` tenants sends the same ``--rows``-row CSV twice at once under one
``Idempotency-Key`` (a client retrying a slow upload), then polls ``GET /v1/jobs/{id}`` every
``--poll-interval-s`` for ``--poll-s`` seconds. The client records every status request's latency
as it observed it, and when it started, so the polls made while any upload was in flight are
reported on their own. No worker runs: the jobs stay queued, which is what the status route
serves most of the time.

Checks: exactly one job per client (idempotency under concurrency), no 5xx, and the status
route's p99 under ``--p99-target-ms`` (50) over all polls and over the polls made during uploads.
Exits 1 when a check fails.

    .venv/bin/python scripts/bench/load.py                     # 50 clients, 2,000 rows each
    .venv/bin/python scripts/bench/load.py --clients 20 --rows 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------ the load client


async def _one_client(
    base_url: str, key: str, csv_bytes: bytes, index: int, args: argparse.Namespace
) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": f"load-{index}"}
    out: dict[str, Any] = {"uploads": [], "polls": [], "statuses": []}
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:

        async def upload() -> tuple[int, str | None, float, float]:
            start = time.monotonic()
            resp = await client.post(
                "/v1/jobs",
                headers=headers,
                data={"task": "summarize", "model": "load-bench"},
                files={"file": ("docs.csv", csv_bytes, "text/csv")},
            )
            job = resp.json().get("id") if resp.status_code < 300 else None
            return resp.status_code, job, start, time.monotonic()

        results = await asyncio.gather(upload(), upload())
        out["uploads"] = [[code, job, start, end] for code, job, start, end in results]
        out["statuses"] += [code for code, *_ in results]
        job_ids = {job for _, job, _, _ in results if job}
        if len(job_ids) != 1:
            out["error"] = f"client {index}: job ids {sorted(job_ids)}"
            return out
        job_id = job_ids.pop()
        until = time.monotonic() + args.poll_s
        while time.monotonic() < until:
            start = time.monotonic()
            resp = await client.get(
                f"/v1/jobs/{job_id}", headers={"Authorization": headers["Authorization"]}
            )
            end = time.monotonic()
            out["polls"].append([start, end - start])
            out["statuses"].append(resp.status_code)
            await asyncio.sleep(args.poll_interval_s)
    return out


async def _client_main(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.client).read_text())
    csv_bytes = Path(spec["csv"]).read_bytes()
    started = time.monotonic()
    runs = await asyncio.gather(
        *[
            _one_client(spec["base_url"], key, csv_bytes, i, args)
            for i, key in enumerate(spec["keys"])
        ]
    )
    json.dump({"runs": runs, "started": started}, sys.stdout)


# ------------------------------------------------------------------------------- the benchmark


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--poll-s", type=float, default=15.0, help="seconds each client polls")
    parser.add_argument("--poll-interval-s", type=float, default=1.0)
    parser.add_argument("--p99-target-ms", type=float, default=50.0)
    parser.add_argument("--client", help=argparse.SUPPRESS)  # the load client's own process
    args = parser.parse_args()
    if args.client:
        asyncio.run(_client_main(args))
        return 0

    import httpx

    from scripts.bench import ingest
    from service.store.engine import session_scope
    from service.store.keys import create_key

    ctx = ingest.local_context()
    ingest.create_database(ctx)
    api = None
    try:
        with session_scope(ctx.database_url) as session:
            keys = [create_key(session, f"load-tenant-{i}") for i in range(args.clients)]
        csv_path = ctx.tmp / f"docqueue-load-{args.rows}.csv"
        ingest.generate_csv(csv_path, args.rows, 60)
        spec_path = ctx.tmp / f"docqueue-load-{ctx.db_name}.json"
        api = ingest.Api(
            ingest.free_port(), ctx.database_url, ctx.redis_url, ctx.tmp / "docqueue-load-api.log"
        )
        spec_path.write_text(
            json.dumps({"base_url": api.base_url, "keys": keys, "csv": str(csv_path)})
        )
        print(
            f"{args.clients} clients x 2 concurrent uploads of {args.rows} rows "
            f"({csv_path.stat().st_size / 1024:.0f} KiB), then polling every "
            f"{args.poll_interval_s}s for {args.poll_s}s; api pid {api.proc.pid}",
            flush=True,
        )
        for _ in range(4):  # warm-up: the first uploads wait for the API's submit processes
            httpx.post(
                f"{api.base_url}/v1/jobs",
                headers={"Authorization": f"Bearer {keys[0]}"},
                data={"task": "summarize", "model": "load-bench"},
                files={"file": ("warm.csv", b"text\nwarm-up\n", "text/csv")},
                timeout=120,
            ).raise_for_status()
        wall = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--client",
                str(spec_path),
                "--poll-s",
                str(args.poll_s),
                "--poll-interval-s",
                str(args.poll_interval_s),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.monotonic() - wall
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        report = json.loads(proc.stdout)
        import psycopg

        with psycopg.connect(ctx.pg_dsn) as conn:
            row = conn.execute(
                "SELECT count(*), coalesce(sum(total), 0) FROM jobs WHERE source_name = 'docs.csv'"
            ).fetchone()
            jobs, docs = (int(row[0]), int(row[1])) if row else (0, 0)
    finally:
        if api is not None:
            api.stop()
        ingest.cleanup(ctx)

    runs = report["runs"]
    uploads = [u for r in runs for u in r["uploads"]]
    windows = [(u[2], u[3]) for u in uploads]
    polls = [p for r in runs for p in r["polls"]]
    during = [lat for start, lat in polls if any(a <= start <= b for a, b in windows)]
    all_lat = [lat for _, lat in polls]
    last_upload = max(b for _, b in windows)
    after = [lat for start, lat in polls if start > last_upload]
    late = [lat for start, lat in polls if start > last_upload + 5]
    upload_s = [u[3] - u[2] for u in uploads]
    statuses = [s for r in runs for s in r["statuses"]]
    errors = [r["error"] for r in runs if "error" in r]
    five_xx = sum(1 for s in statuses if s >= 500)
    other_4xx = sum(1 for s in statuses if 400 <= s < 500)

    def ms(v: float) -> str:
        return f"{v * 1000:,.1f}"

    print(f"wall {wall:.1f}s; jobs in the database {jobs} (documents {docs:,})")
    print(f"responses: 5xx {five_xx}, 4xx {other_4xx}")
    up50, up99 = ms(statistics.median(upload_s)), ms(_pct(upload_s, 0.99))
    print(f"uploads: {len(uploads)}; latency p50 {up50} ms, p99 {up99} ms")
    print("| status polls | n | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, lat in (
        ("all", all_lat),
        ("while uploads were in flight", during),
        ("after the last upload", after),
        ("5 s after the last upload", late),
    ):
        if lat:
            print(
                f"| {name} | {len(lat)} | {ms(_pct(lat, 0.5))} | {ms(_pct(lat, 0.9))} | "
                f"{ms(_pct(lat, 0.99))} | {ms(max(lat))} |"
            )
    failed = []
    if jobs != args.clients or errors:
        failed.append(f"expected exactly {args.clients} jobs, found {jobs}; {errors[:3]}")
    if five_xx:
        failed.append(f"{five_xx} responses were 5xx")
    target = args.p99_target_ms / 1000
    if _pct(all_lat, 0.99) > target:
        failed.append(f"status p99 {ms(_pct(all_lat, 0.99))} ms > {args.p99_target_ms} ms")
    if during and _pct(during, 0.99) > target:
        failed.append(
            f"status p99 during uploads {ms(_pct(during, 0.99))} ms > {args.p99_target_ms} ms"
        )
    for f in failed:
        print(f"FAIL: {f}")
    print("PASS" if not failed else "target missed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
