"""Bubbles at GPU step times (issue 14): a SIMULATION, never a GPU result.

On a GPU a decode step takes ~15 ms whatever the host does, so the cost of feeding the engine
chunk by chunk is idle steps, not CPU: a synchronous loop's last rows of each chunk decode
alone (stragglers) and the engine waits while results are written. This benchmark measures
that with the simulated engine (``workers/engines/sim.py``, ``DOCQUEUE_ENGINE=sim``): continuous
batching up to ``--max-num-seqs``, a step of ``--step-ms`` plus ``--step-ms-per-seq`` per
running sequence, prompts prefilled at ``--prefill-tokens-per-ms`` in the step that admits
them, output lengths drawn per prompt from its token ids (some stop at 5 tokens, some run to
``--max-tokens``), every step slept in wall time (almost no CPU). Three ways through the same
documents, with the same engine parameters:

  (a) one engine call with every prompt (the ceiling), in this process;
  (b) a synchronous chunk loop, in this process: submit 256, wait for all, INSERT the results
      into a scratch PostgreSQL table, next (what a user would write);
  (c) docqueue end to end: ``POST /v1/jobs`` to a real ``docqueue api``, Redis, one real
      ``docqueue worker`` with ``DOCQUEUE_ENGINE=sim``, PostgreSQL; timed from the submit to
      the poll (every 0.1 s) that sees the job completed.

(a) and (b) render each document exactly as the worker does (``workers.prompts.render``), so
every path gets the same token ids and output lengths; the run fails if the three paths'
output tokens differ. Each round runs (a), (b), (c) back to back, order rotated; the median of
the per-round ratios counts. Exits non-zero unless the median c/a is at least 0.97. The
worker takes ``DOCQUEUE_WORKER_CONCURRENCY``, ``DOCQUEUE_SUB_BATCH_SIZE`` and
``DOCQUEUE_DISPATCH_AHEAD`` from the environment, for what-ifs.

    .venv/bin/python scripts/bench/gpusim.py                       # 5,000 docs, 3 rounds
    .venv/bin/python scripts/bench/gpusim.py --docs 1000 --rounds 1 --redis-db 8   # quick check
    DOCQUEUE_WORKER_CONCURRENCY=2 .venv/bin/python scripts/bench/gpusim.py --rounds 3
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.settings import EngineSettings  # noqa: E402
from service.store.chunks import Doc  # noqa: E402
from workers.engines.base import GenRequest  # noqa: E402
from workers.engines.sim import BusyPeriod, SimEngine, SimParams  # noqa: E402
from workers.prompts import render  # noqa: E402

TARGET_RATIO = 0.97
CHUNK = 256
MODEL = "sim-gpu"
POLL_S = 0.1
PERIOD_LINE = re.compile(
    r"sim busy period ([\d.]+) ([\d.]+) steps (\d+) tokens (\d+) starved (\d+)"
)
WORDS = (  # noqa: SIM905 - a sentence reads better than a list literal
    "the quarterly report notes rising costs in shipping while the support team closed most "
    "tickets within a day customers asked about refunds delays invoices and new releases of "
    "the mobile app engineers fixed outages upgraded databases and reviewed dashboards alerts"
).split()


def documents(n: int, seed: int = 14) -> list[str]:
    """Documents of 20 to 200 words (prompt lengths vary as real ones do), distinct."""
    rng = random.Random(seed)
    return [
        f"Document {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))
        for i in range(n)
    ]


def requests_for(engine: SimEngine, texts: list[str], start: int, max_tokens: int) -> list[Any]:
    """The worker's own rendering of a generate job's rows (the default template: the text)."""
    tok = engine.tokenizer()
    budget = engine.max_model_len - max_tokens
    return [
        GenRequest(
            render(tok, "generate", {}, Doc(start + k + 1, None, t, None), budget).token_ids,
            max_tokens,
        )
        for k, t in enumerate(texts)
    ]


# ------------------------------------------------------------- (a) and (b): in this process


Window = tuple[float, float]  # a phase's start and end on time.monotonic()


def run_all_at_once(
    engine: SimEngine, texts: list[str], max_tokens: int
) -> tuple[float, int, Window]:
    """Prompts rendered before the clock starts: the ceiling is the engine's time alone."""
    requests = requests_for(engine, texts, 0, max_tokens)
    started = time.monotonic()
    batch = engine.submit(requests)
    if not batch.wait(3600) or batch.failure is not None:
        raise RuntimeError(f"(a) did not finish: {batch.failure}")
    ended = time.monotonic()
    tokens = sum(r.completion_tokens for r in batch.results if r is not None)
    return ended - started, tokens, (started, ended)


def run_chunk_loop(
    engine: SimEngine, texts: list[str], max_tokens: int, dsn: str
) -> tuple[float, int, Window]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS gpusim_loop (idx int PRIMARY KEY, output text, "
            "completion_tokens int)"
        )
        conn.execute("TRUNCATE gpusim_loop")
        started = time.monotonic()
        tokens = 0
        for start in range(0, len(texts), CHUNK):
            batch = engine.submit(
                requests_for(engine, texts[start : start + CHUNK], start, max_tokens)
            )
            if not batch.wait(3600) or batch.failure is not None:
                raise RuntimeError(f"(b) did not finish: {batch.failure}")
            rows = [
                (start + k, r.text, r.completion_tokens)
                for k, r in enumerate(batch.results)
                if r is not None
            ]
            tokens += sum(r[2] for r in rows)
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO gpusim_loop VALUES (%s, %s, %s)", rows)
        ended = time.monotonic()
        return ended - started, tokens, (started, ended)


# ------------------------------------------------------------------ (c): docqueue end to end


def sim_env(p: SimParams) -> dict[str, str]:
    return {
        "DOCQUEUE_ENGINE": "sim",  # the simulated engine, named as such; never the default
        "DOCQUEUE_SIM_STEP_MS": str(p.step_ms),
        "DOCQUEUE_SIM_STEP_MS_PER_SEQ": str(p.step_ms_per_seq),
        "DOCQUEUE_SIM_MAX_NUM_SEQS": str(p.max_num_seqs),
        "DOCQUEUE_SIM_PREFILL_TOKENS_PER_MS": str(p.prefill_tokens_per_ms),
    }


class Docqueue:
    """The real API and one real ``docqueue worker`` on the simulated engine."""

    def __init__(self, ingest: Any, ctx: Any, params: SimParams, workdir: Path) -> None:
        self.ingest, self.ctx = ingest, ctx
        self.api = ingest.Api(
            ingest.free_port(), ctx.database_url, ctx.redis_url, workdir / "api.log"
        )
        env = {
            **os.environ,
            **sim_env(params),
            "DOCQUEUE_DATABASE_URL": ctx.database_url,
            "DOCQUEUE_REDIS_URL": ctx.redis_url,
            "DOCQUEUE_LOG_LEVEL": "INFO",  # the engine's busy periods (see ``periods``)
        }
        self.log_path = workdir / "worker.log"
        self.worker = ingest.start_worker(MODEL, env, self.log_path, loglevel="info")

    def wait_ready(self, timeout_s: float = 120) -> None:
        self.ingest.wait_worker_ready(
            self.ctx.pg_dsn, MODEL, [self.worker], self.log_path, timeout_s
        )

    def periods(self, since: float, until: float) -> list[BusyPeriod]:
        """The worker's simulated GPU busy periods within [since, until] (time.monotonic(), one
        clock for every process of the host), from its log."""
        found = []
        for m in PERIOD_LINE.finditer(self.log_path.read_text(errors="replace")):
            period = BusyPeriod(float(m[1]), float(m[2]), int(m[3]), int(m[4]), int(m[5]))
            if period.started >= since and period.ended <= until:
                found.append(period)
        return found

    def run(
        self, texts: list[str], max_tokens: int, chunk_size: int = CHUNK
    ) -> tuple[float, int, float, float, tuple[float, float]]:
        """(seconds from submit to the poll that saw it completed, output tokens, seconds to
        the first claim, seconds from the job's finished_at to that poll, and the submit and
        that poll on the monotonic clock)."""
        import httpx

        buf = io.StringIO()
        csv.writer(buf).writerows([["text"], *[[t] for t in texts]])
        body = buf.getvalue().encode()
        data = {
            "task": "generate",
            "model": MODEL,
            "max_tokens": str(max_tokens),
            "temperature": "0",
            "chunk_size": str(chunk_size),
        }
        headers = {"Authorization": f"Bearer {self.ctx.key}"}
        with httpx.Client(base_url=self.api.base_url, headers=headers, timeout=120) as http:
            started, mono = time.time(), time.monotonic()
            resp = http.post("/v1/jobs", data=data, files={"file": ("docs.csv", body, "text/csv")})
            resp.raise_for_status()
            job_id = resp.json()["id"]
            while True:
                time.sleep(POLL_S)
                job = http.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("completed", "failed", "cancelled"):
                    seen, seen_mono = time.time(), time.monotonic()
                    break
        if job["status"] != "completed" or job["counts"]["succeeded"] != len(texts):
            raise RuntimeError(f"docqueue job did not complete cleanly: {job}")
        finished = datetime.fromisoformat(job["finished_at"]).timestamp()
        first = datetime.fromisoformat(job["started_at"]).timestamp()
        return (
            seen - started,
            int(job["tokens"]["completion"]),
            first - started,
            seen - finished,
            (mono, seen_mono),
        )

    def stop(self) -> None:
        self.ingest.stop_group(self.worker, timeout_s=30)
        self.api.stop()


# ---------------------------------------------------------------------------------- main


def ideal_tok_s(engine: SimEngine, texts: list[str], max_tokens: int) -> float:
    """Output tokens per second of a GPU that always runs ``max_num_seqs`` sequences: the
    simulation's asymptote, printed to show how close (a) gets."""
    reqs = requests_for(engine, texts, 0, max_tokens)
    p = engine.params
    from workers.engines.sim import output_tokens

    tokens = sum(output_tokens(r.prompt_token_ids, max_tokens) for r in reqs)
    prefill = sum(len(r.prompt_token_ids) for r in reqs) / p.prefill_tokens_per_ms
    steps = tokens / p.max_num_seqs
    ms = steps * (p.step_ms + p.step_ms_per_seq * p.max_num_seqs) + prefill
    return tokens / (ms / 1000.0)


def main(argv: list[str] | None = None) -> int:
    d = EngineSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--docs", type=int, default=5000)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="rounds of (a), (b), (c)")
    p.add_argument("--step-ms", type=float, default=d.sim_step_ms)
    p.add_argument("--step-ms-per-seq", type=float, default=d.sim_step_ms_per_seq)
    p.add_argument("--max-num-seqs", type=int, default=d.sim_max_num_seqs)
    p.add_argument("--prefill-tokens-per-ms", type=float, default=d.sim_prefill_tokens_per_ms)
    p.add_argument("--redis-db", type=int, default=14, help="the other benchmarks' db: 14")
    p.add_argument("--phases", default="abc", help="what-ifs: 'ac' skips the chunk loop")
    p.add_argument(
        "--show-periods", action="store_true", help="print (c)'s engine busy periods each round"
    )
    args = p.parse_args(argv)
    if not {"a", "c"} <= set(args.phases) <= {"a", "b", "c"}:
        p.error("--phases: a and c, and b or not")

    params = SimParams(
        args.step_ms, args.step_ms_per_seq, args.max_num_seqs, args.prefill_tokens_per_ms
    )
    from scripts.bench import ingest

    texts = documents(args.docs)
    ctx = dataclasses.replace(
        ingest.local_context(), redis_url=f"redis://127.0.0.1:6379/{args.redis_db}"
    )
    ingest.create_database(ctx)
    engine = SimEngine(MODEL, params)
    ideal = ideal_tok_s(engine, texts, args.max_tokens)
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="docqueue-gpusim-") as tmp:
            dq = Docqueue(ingest, ctx, params, Path(tmp))
            try:
                dq.wait_ready()
                dq.run(texts[:24], args.max_tokens, chunk_size=8)  # warm-up: 3 chunks, untimed
                run_all_at_once(engine, texts[:8], args.max_tokens)  # warm-up, untimed
                pids = {"worker": dq.worker.pid, "api": dq.api.proc.pid}
                for n in range(args.rounds):
                    row: dict[str, Any] = {}
                    order = (
                        args.phases[n % len(args.phases) :] + args.phases[: n % len(args.phases)]
                    )
                    for phase in order:  # rotated: no slot bias
                        cpu0 = _cpu(ingest, pids)
                        if phase == "a":
                            secs, toks, window = run_all_at_once(engine, texts, args.max_tokens)
                        elif phase == "b":
                            secs, toks, window = run_chunk_loop(
                                engine, texts, args.max_tokens, ctx.pg_dsn
                            )
                        else:
                            secs, toks, first_s, seen_s, window = dq.run(texts, args.max_tokens)
                            row["c_first_claim_s"], row["c_poll_lag_s"] = first_s, seen_s
                        time.sleep(0.2)  # the engines log their last busy period on going idle
                        found = (
                            dq.periods(*window)
                            if phase == "c"
                            else [x for x in engine.periods if x.started >= window[0]]
                        )
                        row[f"{phase}_engine"] = engine_time(found, window, params)
                        if args.show_periods and phase == "c":
                            for x in found:
                                print(
                                    f"  (c) busy {x.started - window[0]:8.3f} s to"
                                    f" {x.ended - window[0]:8.3f} s after the submit:"
                                    f" {x.steps} steps, {x.starved_steps} starved",
                                    flush=True,
                                )
                        row[phase] = (secs, toks, toks / secs)
                        row[f"{phase}_cpu"] = {
                            k: v - cpu0[k] for k, v in _cpu(ingest, pids).items()
                        }
                    rows.append(row)
                    print(
                        f"round {n + 1}/{args.rounds}: "
                        + "  ".join(
                            f"({k}) {row[k][2]:,.0f} tok/s" for k in sorted(row) if len(k) == 1
                        )
                        + f"  c/a {row['c'][2] / row['a'][2]:.3f}"
                        + (f"  b/a {row['b'][2] / row['a'][2]:.3f}" if "b" in row else ""),
                        flush=True,
                    )
            finally:
                dq.stop()
    finally:
        engine.close()
        ingest.cleanup(ctx)
    return report(args, params, rows, ideal)


def engine_time(periods: list[BusyPeriod], window: Window, p: SimParams) -> dict[str, float]:
    """Where a phase's wall time went on the simulated GPU."""
    if not periods:
        return {}
    first, last = min(x.started for x in periods), max(x.ended for x in periods)
    busy = sum(x.ended - x.started for x in periods)
    steps = sum(x.steps for x in periods)
    return {
        "to_first_step": first - window[0],
        "busy": busy,
        "idle_between": (last - first) - busy,
        "after_last_step": window[1] - last,
        "starved_pct": 100.0 * sum(x.starved_steps for x in periods) / steps,
        "occupancy_pct": 100.0 * sum(x.tokens for x in periods) / (steps * p.max_num_seqs),
    }


def _cpu(ingest: Any, pids: dict[str, int]) -> dict[str, float]:
    s = {name: ingest.tree_cpu_s(pid) for name, pid in pids.items()}
    s["bench"] = sum(os.times()[:2])  # this process: (a), (b) and the client of (c)
    s["machine"] = ingest.system_busy_s()
    return s


def report(args: Any, params: SimParams, rows: list[dict[str, Any]], ideal: float) -> int:
    print()
    print(
        f"SIMULATED GPU (workers/engines/sim.py; not a GPU result): step {params.step_ms} ms"
        f" + {params.step_ms_per_seq} ms/seq, max_num_seqs {params.max_num_seqs}, prefill"
        f" {params.prefill_tokens_per_ms} tokens/ms; {args.docs} documents, max_tokens"
        f" {args.max_tokens}, chunk {CHUNK}; {args.rounds} rounds, order rotated. Worker:"
        f" concurrency {os.environ.get('DOCQUEUE_WORKER_CONCURRENCY', 'default')},"
        f" sub-batch {os.environ.get('DOCQUEUE_SUB_BATCH_SIZE', 'default')},"
        f" dispatch ahead {os.environ.get('DOCQUEUE_DISPATCH_AHEAD', 'default')}"
    )
    names = {
        "a": "(a) all prompts in one engine call",
        "b": "(b) chunk loop: 256, wait, write, next",
        "c": "(c) docqueue: API, Redis, worker, PG",
    }
    print(f"{'':40} {'median s':>9} {'out tokens':>11} {'median tok/s':>13}   every round (tok/s)")
    phases = sorted(args.phases)
    for k in phases:
        every = ", ".join(f"{r[k][2]:,.0f}" for r in rows)
        secs = statistics.median(r[k][0] for r in rows)
        rate = statistics.median(r[k][2] for r in rows)
        print(f"{names[k]:40} {secs:9.2f} {rows[0][k][1]:11,} {rate:13,.0f}   {every}")
    print(f"{'full engine every step (asymptote)':40} {'':9} {'':11} {ideal:13,.0f}")
    tokens = {r[k][1] for r in rows for k in phases}
    same = len(tokens) == 1
    if not same:
        print(f"MISMATCH: the paths generated different token counts {sorted(tokens)}")
    ca = [r["c"][2] / r["a"][2] for r in rows]
    fmt = ", ".join
    print(f"c/a per round: {fmt(f'{x:.3f}' for x in ca)}  (median {statistics.median(ca):.3f})")
    if "b" in phases:
        ba = [r["b"][2] / r["a"][2] for r in rows]
        cb = [r["c"][2] / r["b"][2] for r in rows]
        print(f"b/a per round: {fmt(f'{x:.3f}' for x in ba)}  (median {statistics.median(ba):.3f})")
        print(f"c/b per round: {fmt(f'{x:.3f}' for x in cb)}  (median {statistics.median(cb):.3f})")
    print(
        "(c) submit to first claim, s: "
        + ", ".join(f"{r['c_first_claim_s']:.2f}" for r in rows)
        + "; finished_at to the poll that saw it, s: "
        + ", ".join(f"{r['c_poll_lag_s']:.2f}" for r in rows)
    )
    print(
        "Where the wall time went on the simulated GPU, means over rounds (s; starved: steps"
        " with free slots and nothing waiting; occupancy: slots used per step):"
    )
    cols = ["to_first_step", "busy", "idle_between", "after_last_step"]
    print(f"{'':6}" + "".join(f"{c:>16}" for c in cols) + f"{'starved %':>11}{'occupancy %':>13}")
    for k in phases:
        stats = [r[f"{k}_engine"] for r in rows if r[f"{k}_engine"]]
        if not stats:
            print(f"({k})   no busy periods found")
            continue
        cells = "".join(f"{statistics.mean(x[c] for x in stats):16.2f}" for c in cols)
        starved = statistics.mean(x["starved_pct"] for x in stats)
        occupancy = statistics.mean(x["occupancy_pct"] for x in stats)
        print(f"({k})   {cells}{starved:11.1f}{occupancy:13.1f}")
    groups = list(rows[0]["a_cpu"])
    print("CPU seconds per phase, mean over rounds:")
    print(f"{'':6}{'wall s':>8}" + "".join(f"{g:>10}" for g in groups))
    for k in phases:
        wall = statistics.mean(r[k][0] for r in rows)
        cells = "".join(f"{statistics.mean(r[k + '_cpu'][g] for r in rows):10.2f}" for g in groups)
        print(f"({k})   {wall:8.2f}{cells}")
    ok = same and statistics.median(ca) >= TARGET_RATIO
    print(
        "PASS" if ok else "MISS",
        f"(median c/a {statistics.median(ca):.3f}, target >= {TARGET_RATIO}; a simulation)",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
