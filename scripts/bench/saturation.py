"""Engine saturation: docqueue end to end against raw vLLM on the same model and prompts.

Three ways through the same N documents (temperature 0):
  (a) raw vLLM: ``LLM.chat`` with every conversation in one call — the ceiling for one engine.
      Its engine has the configuration docqueue's worker runs with on this host
      (``workers.engines.vllm_engine.engine_kwargs``), so the ratios measure docqueue, not a
      setting; ``--raw-vllm-defaults`` gives it vLLM's own defaults instead;
  (b) a synchronous chunk loop: ``LLM.chat`` on 256 documents, write them to Postgres, repeat —
      what a user would otherwise write;
  (c) docqueue: ``POST /v1/jobs`` to a real API, Redis, one real ``docqueue worker`` (Celery +
      vLLM), Postgres, until the job is ``completed``.
Both engines are started first and stay warm; the idle side's engine processes are frozen
(SIGSTOP) while the other side runs, so each phase has the machine to itself. Each round runs
(a), (b) and (c) one after the other, so drift in a shared machine hits all three alike and
each round gives a side-by-side ratio. Engine start is excluded everywhere: (c)'s worker builds
its engine before any job exists, and (c)'s clock runs from the submit to the job's
``finished_at``. CPU seconds per process group show where the cores went in each phase.

    .venv/bin/python scripts/bench/saturation.py --rounds 7           # tiny model, 2,000 docs
    .venv/bin/python scripts/bench/saturation.py --model smollm2 --docs 256 --max-tokens 48
    .venv/bin/python scripts/bench/saturation.py --rounds 5 --raw-vllm-defaults --compiled
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import signal
import statistics
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

TARGET_RATIO = 0.97
CHUNK = 256
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
REPLY = "@@saturation "


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def documents(n: int) -> list[str]:
    """Varied short documents, so prompts differ in length as real ones do."""
    topics = ["invoice", "outage", "refund", "release", "forecast", "contract", "survey"]
    return [
        f"Report {i}: the {topics[i % len(topics)]} team noted "
        + " ".join(f"item{(i * 7 + k) % 97}" for k in range(5 + i % 23))
        + "."
        for i in range(n)
    ]


# ------------------------------------------------------------ (a) and (b): raw vLLM server


def raw_server(spec_path: str) -> None:
    """Child process: one warm engine; runs (a) or (b) for each command read from stdin and
    answers with one ``@@saturation {json}`` line on stdout (vLLM may print other lines)."""
    import psycopg
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    if spec["vllm_defaults"]:  # what a user would write: vLLM's own defaults (compiled)
        llm = LLM(model=spec["model"], seed=0, disable_log_stats=True)
    else:  # the engine configuration docqueue's worker runs with on this host
        from workers.engines.vllm_engine import _on_cpu, engine_kwargs

        device = "cpu" if _on_cpu() else "cuda"
        llm = LLM(**engine_kwargs(spec["model"], device=device, enforce_eager=spec["eager"]))
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    convs: Any = [[{"role": "user", "content": t}] for t in spec["texts"]]
    llm.chat(convs[:8], params, use_tqdm=False)  # warm-up, not timed

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(REPLY + json.dumps(obj) + "\n")
        sys.stdout.flush()

    with psycopg.connect(spec["dsn"], autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS loop_results (idx int PRIMARY KEY, output text, "
            "completion_tokens int)"
        )
        reply({"ready": True})
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "a":
                started = time.perf_counter()
                outs = llm.chat(convs, params, use_tqdm=False)
                secs = time.perf_counter() - started
                reply({"secs": secs, "tokens": sum(len(o.outputs[0].token_ids) for o in outs)})
            elif cmd == "b":
                conn.execute("TRUNCATE loop_results")
                started = time.perf_counter()
                tokens = 0
                for start in range(0, len(convs), CHUNK):
                    part = llm.chat(convs[start : start + CHUNK], params, use_tqdm=False)
                    rows = [
                        (start + k, o.outputs[0].text, len(o.outputs[0].token_ids))
                        for k, o in enumerate(part)
                    ]
                    tokens += sum(r[2] for r in rows)
                    with conn.cursor() as cur:
                        cur.executemany("INSERT INTO loop_results VALUES (%s, %s, %s)", rows)
                reply({"secs": time.perf_counter() - started, "tokens": tokens})
            else:
                break


class RawServer:
    def __init__(self, spec: Path, log: Path) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--raw-server", str(spec)],
            env={**os.environ, **ENGINE_ENV},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        self.log_path = log

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return dict(json.loads(line[len(REPLY) :]))
        tail = self.log_path.read_text()[-4000:]
        raise RuntimeError(f"raw vLLM process exited ({self.proc.wait()}):\n{tail}")

    def wait_ready(self) -> None:
        self._read()

    def run(self, phase: str) -> tuple[float, int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(phase + "\n")
        self.proc.stdin.flush()
        r = self._read()
        return float(r["secs"]), int(r["tokens"])

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self._log.close()


# ------------------------------------------------------------------ (c): docqueue end to end


class Docqueue:
    """The real API and one real ``docqueue worker`` (engine warm before any job exists)."""

    def __init__(
        self, ingest: Any, ctx: Any, model: str, workdir: Path, eager: bool | None = None
    ) -> None:
        self.ingest, self.ctx, self.model = ingest, ctx, model
        self.dsn = ctx.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.api = ingest.Api(
            ingest.free_port(), ctx.database_url, ctx.redis_url, workdir / "api.log"
        )
        env = {
            **os.environ,
            **ENGINE_ENV,
            "DOCQUEUE_DATABASE_URL": ctx.database_url,
            "DOCQUEUE_REDIS_URL": ctx.redis_url,
            "DOCQUEUE_VLLM_KV_CACHE_GIB": "2",
        }
        if eager is not None:  # else the worker's default: eager on CPU, compiled on GPUs
            env["DOCQUEUE_VLLM_ENFORCE_EAGER"] = "true" if eager else "false"
        exe = Path(sys.executable).with_name("docqueue")
        self.log_path = workdir / "worker.log"
        self._log = self.log_path.open("ab")
        self.worker = subprocess.Popen(
            [str(exe), "worker", "--model", model, "--gpus", "none", "--loglevel", "warning"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 600) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            with psycopg.connect(self.dsn) as conn:
                ready = conn.execute(
                    "SELECT 1 FROM workers WHERE model = %s AND engine_ready", (self.model,)
                ).fetchone()
            if ready:
                return
            if self.worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; see {self.log_path}")
            time.sleep(0.5)

    def warm_up(self, texts: list[str], max_tokens: int) -> None:
        """One small untimed job, as (a) and (b) get an untimed ``LLM.chat`` of 8 prompts:
        three chunks, so each of the worker's chunk threads has loaded its tokenizer and opened
        its database connection before the timed jobs."""
        self.run(texts[:9], max_tokens, chunk_size=3)

    def run(
        self, texts: list[str], max_tokens: int, chunk_size: int = CHUNK
    ) -> tuple[float, int, float]:
        """(seconds from submit to finished_at, output tokens, seconds to the first claim)."""
        import httpx

        buf = io.StringIO()
        csv.writer(buf).writerows([["text"], *[[t] for t in texts]])
        headers = {"Authorization": f"Bearer {self.ctx.key}"}
        data = {
            "task": "generate",
            "model": self.model,
            "max_tokens": str(max_tokens),
            "temperature": "0",
            "chunk_size": str(chunk_size),
        }
        body = buf.getvalue().encode()
        # One client, made before the clock starts: a fresh httpx client per poll builds an
        # SSL context each time, CPU this harness would take from the engine under test.
        with httpx.Client(base_url=self.api.base_url, headers=headers, timeout=120) as http:
            started = time.time()
            resp = http.post("/v1/jobs", data=data, files={"file": ("docs.csv", body, "text/csv")})
            resp.raise_for_status()
            job_id = resp.json()["id"]
            while True:  # slow polls: the timing comes from the job's own finished_at
                time.sleep(1.0)
                job = http.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("completed", "failed", "cancelled"):
                    break
        if job["status"] != "completed" or job["counts"]["succeeded"] != len(texts):
            raise RuntimeError(f"docqueue job did not complete cleanly: {job}")
        finished = datetime.fromisoformat(job["finished_at"]).timestamp()
        first = datetime.fromisoformat(job["started_at"]).timestamp()
        return finished - started, int(job["tokens"]["completion"]), first - started

    def stop(self) -> None:
        self.ingest.stop_group(self.worker)
        self.api.stop()
        self._log.close()


# ------------------------------------------------------------------------------ accounting


def _role(pid: int) -> str:
    """vLLM's processes name themselves: the scheduler loop and the model runner."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""
    if title.startswith("VLLM::EngineCore"):
        return "core"
    if title.startswith("VLLM::Worker"):
        return "model"
    return ""


def engine_pids(ingest: Any, root: int) -> list[int]:
    """The vLLM engine processes (scheduler loop, model runner) under ``root``."""
    return [p for p in (root, *ingest._children(root)) if _role(p)]


class Frozen:
    """SIGSTOP the idle side's engine processes for one phase, SIGCONT after.

    Both engines stay warm between phases, but an idle vLLM-CPU engine is not quite idle: here
    it used 0.3-0.9 CPU-seconds during the other side's 19 s phase, a few per cent of two
    cores taken from whichever engine is measured, unevenly. Frozen, the idle side uses no CPU at
    all, so each phase has the machine to itself, as it would on a host of its own.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def __enter__(self) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)

    def __exit__(self, *exc: object) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGCONT)


def _comm_cpu_s(ingest: Any, name: str) -> float:
    """CPU seconds of every process whose command name is ``name``."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    total += ingest._cpu_s(int(entry))
            except OSError:
                continue
    return total


class CpuMeter:
    """CPU seconds per process group over one phase, and the machine's busy seconds."""

    def __init__(self, ingest: Any, groups: dict[str, int]) -> None:
        self.ingest, self.groups = ingest, groups

    def sample(self) -> dict[str, float]:
        ing = self.ingest
        s: dict[str, float] = {}
        for name, pid in self.groups.items():
            for p in (pid, *ing._children(pid)):
                part = _role(p)
                key = f"{name}:{part}" if part else name
                s[key] = s.get(key, 0.0) + ing._cpu_s(p)
        s["postgres"] = ing.postgres_cpu_s() or 0.0
        s["redis"] = _comm_cpu_s(ing, "redis-server")
        s["bench"] = sum(os.times()[:2])  # this process: uploads, polls, the (b) loop's client
        s["machine"] = ing.system_busy_s()
        return s

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        d = {k: after.get(k, 0.0) - before[k] for k in before}
        d["other"] = d["machine"] - sum(v for k, v in d.items() if k != "machine")
        return d


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | a model path")
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="rounds of (a), (b), (c)")
    p.add_argument(
        "--raw-vllm-defaults",
        action="store_true",
        help="(a), (b): vLLM's own LLM defaults instead of docqueue's engine configuration",
    )
    p.add_argument(
        "--no-freeze-idle",
        dest="freeze_idle",
        action="store_false",
        help="leave the idle side's engine running during the other's phase (see Frozen)",
    )
    p.add_argument(
        "--compiled",
        action="store_true",
        help="both engines compiled (vLLM's default, and docqueue's on GPUs) instead of the eager"
        " mode docqueue's worker uses on CPU hosts for a quick start",
    )
    args = p.parse_args(argv)

    prepare = _load("docqueue_prepare_models", ROOT / "scripts" / "prepare_models.py")
    ingest = _load("docqueue_bench_ingest", ROOT / "scripts" / "bench" / "ingest.py")
    model = {"tiny": prepare.ensure_tiny_model, "smollm2": prepare.ensure_smollm2}.get(
        args.model, lambda: Path(args.model)
    )()
    texts = documents(args.docs)

    ctx = ingest.local_context()
    ingest.create_database(ctx)
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="docqueue-sat-") as tmp:
            work = Path(tmp)
            spec = work / "spec.json"
            spec.write_text(
                json.dumps(
                    {
                        "model": str(model),
                        "texts": texts,
                        "dsn": ctx.pg_dsn,
                        "max_tokens": args.max_tokens,
                        "vllm_defaults": args.raw_vllm_defaults,
                        "eager": False if args.compiled else None,
                    }
                )
            )
            print(f"starting both engines ({model.name}); their start is not timed ...", flush=True)
            raw = RawServer(spec, work / "raw.log")
            dq = Docqueue(ingest, ctx, str(model), work, eager=False if args.compiled else None)
            try:
                raw.wait_ready()  # it ran its warm-up before saying ready
                dq.wait_ready()
                dq.warm_up(texts, args.max_tokens)
                meter = CpuMeter(
                    ingest,
                    {"raw": raw.proc.pid, "worker": dq.worker.pid, "api": dq.api.proc.pid},
                )
                raw_engine = engine_pids(ingest, raw.proc.pid)
                dq_engine = engine_pids(ingest, dq.worker.pid)
                if not raw_engine or not dq_engine:
                    raise RuntimeError("could not find the vLLM engine processes to freeze")
                for n in range(args.rounds):
                    row: dict[str, Any] = {}
                    for phase in "abc"[n % 3 :] + "abc"[: n % 3]:  # rotated: no slot bias
                        before = meter.sample()
                        if phase == "c":
                            with Frozen(raw_engine if args.freeze_idle else []):
                                secs, toks, first_s = dq.run(texts, args.max_tokens)
                            row["c_first_claim_s"] = first_s
                        else:
                            with Frozen(dq_engine if args.freeze_idle else []):
                                secs, toks = raw.run(phase)
                        row[phase] = (secs, toks, toks / secs)
                        row[f"{phase}_cpu"] = CpuMeter.delta(before, meter.sample())
                    rows.append(row)
                    print(
                        f"round {n + 1}/{args.rounds}: "
                        + "  ".join(f"({k}) {row[k][2]:,.0f} tok/s" for k in "abc")
                        + f"  c/a {row['c'][2] / row['a'][2]:.3f}",
                        flush=True,
                    )
            finally:
                raw.stop()
                dq.stop()
    finally:
        ingest.cleanup(ctx)

    print()
    print(
        f"model {model.name}, {args.docs} documents, max_tokens {args.max_tokens}, temperature 0;"
        f" {args.rounds} rounds of (a), (b), (c) back to back, order rotated each round;"
        " engine start excluded everywhere;"
        + (" idle engine frozen (SIGSTOP) during the other's phases;" if args.freeze_idle else "")
        + " raw engine: "
        + ("vLLM defaults" if args.raw_vllm_defaults else "docqueue's engine configuration")
        + ("; both engines compiled" if args.compiled else "; docqueue's worker eager (CPU)")
        + " ((c): submit to job finished_at, the worker's engine warm before the submit)"
    )
    names = {
        "a": "(a) raw vLLM, one LLM.chat call",
        "b": "(b) chunk loop: 256, write, next",
        "c": "(c) docqueue: API, Redis, worker, PG",
    }
    best = {k: max(r[k][2] for r in rows) for k in "abc"}
    print(f"{'':38} {'best s':>7} {'out tokens':>11} {'best tok/s':>11}   every round (tok/s)")
    for k in "abc":
        secs, toks, _ = max((r[k] for r in rows), key=lambda t: t[2])
        every = ", ".join(f"{r[k][2]:,.0f}" for r in rows)
        print(f"{names[k]:38} {secs:7.2f} {toks:11,} {best[k]:11,.0f}   {every}")
    ca = [r["c"][2] / r["a"][2] for r in rows]
    cb = [r["c"][2] / r["b"][2] for r in rows]
    ab = [r["a"][2] / r["b"][2] for r in rows]
    fmt = ", ".join
    print(f"c/a per round: {fmt(f'{x:.3f}' for x in ca)}  (median {statistics.median(ca):.3f})")
    print(f"c/b per round: {fmt(f'{x:.3f}' for x in cb)}  (median {statistics.median(cb):.3f})")
    print(f"a/b per round: {fmt(f'{x:.3f}' for x in ab)}")
    print(f"best c / best a = {best['c'] / best['a']:.3f} (target >= {TARGET_RATIO})")
    total = {k: sum(r[k][1] for r in rows) / sum(r[k][0] for r in rows) for k in "abc"}
    print(
        f"over all rounds (total tokens / total seconds): c/a = {total['c'] / total['a']:.3f}"
        f"   c/b = {total['c'] / total['b']:.3f}"
    )
    first = ", ".join(f"{r['c_first_claim_s']:.2f}" for r in rows)
    print(f"(c) submit to first chunk claimed, s: {first}")
    print("CPU seconds per phase, mean over rounds (2 cores: 2 s of CPU per wall second):")
    groups = [g for g in rows[0]["a_cpu"] if g != "machine"] + ["machine"]
    print(f"{'':6}{'wall s':>8}" + "".join(f"{g:>13}" for g in groups))
    for k in "abc":
        wall = statistics.mean(r[k][0] for r in rows)
        cells = "".join(
            f"{statistics.mean(r[k + '_cpu'].get(g, 0.0) for r in rows):13.2f}" for g in groups
        )
        print(f"({k})   {wall:8.2f}{cells}")
    ok = statistics.median(ca) >= TARGET_RATIO
    print("PASS" if ok else "MISS", f"(median c/a {statistics.median(ca):.3f})")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--raw-server":
        raw_server(sys.argv[2])
    else:
        sys.exit(main())
