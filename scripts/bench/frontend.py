"""Front-end ceiling (issue 14): how many output tokens/s can one worker process take in?

A fast GPU makes tokens faster than a Python front end may turn them into results. This
measures the front end alone: docqueue's ``VllmEngine`` (its driver thread, result conversion)
over vLLM's own front end (``LLMEngine``: input processor, output processor with its
detokenizer, the engine-core client with its output thread), whose engine-core process runs
vLLM's real scheduler over a stub executor (``workers.engines.stub_executor``): no model, each
scheduled sequence gets the next token of real text (tokenized by the model's tokenizer), and a
step takes at least ``step_ms``. The offered rate is max_num_seqs x 1000 / step_ms; step_ms 0
offers as much as the engine core can make. Each point is measured for both output modes side
by side, in one process, against two warm engines: ``final`` (the design: vLLM returns a
request's output when it ends, and the driver decodes it) and ``stream`` (the former design: an
output per token, detokenized by vLLM).

For each point: delivered output tokens/s (the tokens vLLM's output processor took in within
the window, counted token by token), the worker process's CPU by thread (the driver, vLLM's
engine-core output thread, the rest; the bench's own client thread, which stands for the chunk
tasks, apart) and its front-end CPU per delivered token, and the engine-core process's CPU. A
mode's front-end ceiling is 1e6 / its µs a token at its busiest point: the tokens/s its
threads, sharing one GIL, deliver on one core. It is the measured rate once the front end is
saturated (``fe core/s`` near 1.0); where the engine core or other processes hold the CPU
(the cores this CPU build shares with the stub core) delivered stays below offered without
that, and the per-token CPU is the figure that holds. The run fails (exit 1) when the design's
(``final``) ceiling is under ``--target`` (50,000 output tokens/s).

    .venv/bin/python scripts/bench/frontend.py                       # smollm2 tokenizer, sweep
    .venv/bin/python scripts/bench/frontend.py --step-ms 0 --seconds 20   # the ceiling only
    .venv/bin/python scripts/bench/frontend.py --modes final --max-num-seqs 1024 --step-ms 0,10
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET = 50_000.0
SUSTAINED = 0.95  # delivered/offered at or above this: the front end kept up
CLIENT_THREAD = "bench-client"
KV_GIB = 64


@dataclass
class Point:
    mode: str
    step_ms: float
    offered: float | None  # tokens/s; None: as fast as the core goes
    delivered: float = 0.0
    seconds: float = 0.0
    tokens: int = 0
    requests: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # worker-process thread group -> CPU s
    core_cpu: float = 0.0  # the engine-core process's CPU s

    @property
    def front_end_cpu(self) -> float:
        return sum(v for k, v in self.cpu.items() if k != CLIENT_THREAD)

    @property
    def us_per_token(self) -> float:
        return 1e6 * self.front_end_cpu / self.tokens if self.tokens else float("inf")

    @property
    def ceiling(self) -> float:
        """Output tokens/s the front end delivers with one core (its threads share a GIL)."""
        return 1e6 / self.us_per_token


# --- CPU accounting --------------------------------------------------------------------------


def _ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def _thread_cpu() -> dict[int, float]:
    """CPU seconds of each of this process's threads, by native id."""
    out: dict[int, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / _ticks()
    return out


def _thread_groups() -> dict[int, str]:
    """Native thread id -> the group it is reported under."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    groups: dict[int, str] = {}
    for tid in os.listdir("/proc/self/task"):
        name = names.get(int(tid))
        if name is None:
            try:
                name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            except OSError:
                name = "?"
        if name in ("vllm-driver", CLIENT_THREAD, "EngineCoreOutputQueueThread"):
            groups[int(tid)] = name
        else:
            groups[int(tid)] = "other"
    return groups


def _children_cpu() -> float:
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


# --- the workload ----------------------------------------------------------------------------


def token_stream(tokenizer: Any) -> list[int]:
    """Real text's token ids (the repository's example documents and docs), no special
    tokens: what the stub core emits, so detokenizing costs what it does on real output."""
    texts = [p.read_text() for p in sorted((ROOT / "examples").glob("*.csv"))]
    texts += [(ROOT / name).read_text() for name in ("README.md", "ARCHITECTURE.md")]
    ids: list[int] = tokenizer("\n".join(texts), add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids)
    return [t for t in ids if t not in special]


class TokenCounter:
    """Counts the output tokens vLLM's output processor takes in (wrapping its
    ``process_outputs`` on this engine): the front end's throughput, token by token. Counting
    tokens of requests as they end instead would credit a window with whole requests, most of
    whose tokens came before it."""

    def __init__(self, engine: Any) -> None:
        self.tokens = 0
        processor = engine._engine.output_processor
        inner = processor.process_outputs

        def counted(outputs: list[Any], *a: Any, **kw: Any) -> Any:
            n = 0
            for out in outputs:
                n += len(out.new_token_ids)
            self.tokens += n
            return inner(outputs, *a, **kw)

        processor.process_outputs = counted


class Client:
    """Stands for the chunk tasks: keeps twice ``max_num_seqs`` requests in the engine, in
    sub-batches, topped up every 20 ms, and counts the requests that ended."""

    def __init__(self, engine: Any, prompts: list[list[int]], args: argparse.Namespace) -> None:
        self.engine = engine
        self.prompts = prompts
        self.args = args
        self.outstanding = 2 * args.max_num_seqs
        self.rng = random.Random(1)
        self.requests = 0
        self.stop = threading.Event()
        self.batches: list[tuple[Any, list[bool]]] = []
        self.thread = threading.Thread(target=self._run, name=CLIENT_THREAD, daemon=True)

    def _submit(self) -> None:
        from workers.engines.base import GenRequest

        lo = max(1, self.args.max_tokens // 2)
        reqs = [
            GenRequest(
                self.rng.choice(self.prompts),
                max_tokens=self.rng.randint(lo, self.args.max_tokens),
                temperature=0.0,
            )
            for _ in range(self.args.sub_batch)
        ]
        batch = self.engine.submit(reqs)
        self.batches.append((batch, [False] * len(reqs)))

    def _poll(self) -> int:
        """Counts newly ended requests; returns how many are still unfinished."""
        requests = unfinished = 0
        keep = []
        for batch, seen in self.batches:
            if batch.failure is not None:
                raise RuntimeError(f"the engine failed: {batch.failure}")
            for i, res in enumerate(batch.results):
                if seen[i]:
                    continue
                if res is None:
                    unfinished += 1
                    continue
                seen[i] = True
                requests += 1
            if not all(seen):
                keep.append((batch, seen))
        self.batches = keep
        self.requests += requests
        return unfinished

    def _run(self) -> None:
        while not self.stop.is_set():
            unfinished = self._poll()
            while unfinished < self.outstanding:
                self._submit()
                unfinished += self.args.sub_batch
            time.sleep(0.02)

    def drain(self) -> None:
        """Stops feeding and cancels what is left, so the next point starts empty."""
        self.stop.set()
        self.thread.join()
        for batch, _ in self.batches:
            self.engine.cancel(batch)
        deadline = time.monotonic() + 30
        while self.engine._engine.get_num_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)


@dataclass
class Bench:
    """One warm engine of an output mode, its stub's control file and its token counter."""

    mode: str
    engine: Any
    control: Path
    counter: TokenCounter


def measure(bench: Bench, step_ms: float, prompts: list[list[int]], args: Any) -> Point:
    bench.control.write_text(f"{step_ms}")
    time.sleep(0.3)  # the stub re-reads its control file every 0.2 s
    offered = args.max_num_seqs * 1000.0 / step_ms if step_ms > 0 else None
    point = Point(bench.mode, step_ms, offered)
    client = Client(bench.engine, prompts, args)
    counter = bench.counter
    client.thread.start()
    time.sleep(args.warmup_s)  # the batch fills and the first requests end
    groups = _thread_groups()
    cpu0, core0, tok0, req0 = _thread_cpu(), _children_cpu(), counter.tokens, client.requests
    t0 = time.monotonic()
    time.sleep(args.seconds)
    cpu1, core1, tok1, req1 = _thread_cpu(), _children_cpu(), counter.tokens, client.requests
    t1 = time.monotonic()
    client.drain()
    groups.update({tid: g for tid, g in _thread_groups().items() if tid not in groups})
    for tid, used in cpu1.items():
        group = groups.get(tid, "other")
        point.cpu[group] = point.cpu.get(group, 0.0) + used - cpu0.get(tid, 0.0)
    point.seconds = t1 - t0
    point.tokens, point.requests = tok1 - tok0, req1 - req0
    point.delivered = point.tokens / point.seconds
    point.core_cpu = core1 - core0
    return point


def report(points: list[Point]) -> None:
    print()
    print(
        f"{'mode':<7} {'step ms':>7} {'offered':>8} {'delivered':>9} {'ratio':>5} "
        f"{'fe µs/tok':>9} {'fe ceiling':>10} {'fe core/s':>9} {'driver':>6} {'vllm out':>8} "
        f"{'other':>5} {'client':>6} {'core/s':>6}"
    )
    for p in points:
        s = p.seconds
        offered = f"{p.offered:,.0f}" if p.offered else "max"
        ratio = f"{p.delivered / p.offered:.2f}" if p.offered else "-"
        print(
            f"{p.mode:<7} {p.step_ms:>7g} {offered:>8} {p.delivered:>9,.0f} {ratio:>5} "
            f"{p.us_per_token:>9.2f} {p.ceiling:>10,.0f} {p.front_end_cpu / s:>9.2f} "
            f"{p.cpu.get('vllm-driver', 0) / s:>6.2f} "
            f"{p.cpu.get('EngineCoreOutputQueueThread', 0) / s:>8.2f} "
            f"{p.cpu.get('other', 0) / s:>5.2f} {p.cpu.get(CLIENT_THREAD, 0) / s:>6.2f} "
            f"{p.core_cpu / s:>6.2f}"
        )
    print(
        "tokens/s; fe: the worker process less the bench's client thread; fe ceiling: 1e6 / fe "
        "µs/tok, what the front end delivers on one core; core/s: CPU s a second (driver: "
        "docqueue's driver thread with vLLM's output processor; vllm out: vLLM's engine-core "
        "output thread; core: the engine-core process)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--modes", default="final,stream", help="final (the design), stream (former)")
    ap.add_argument("--step-ms", default="0,8,5,3", help="stub step times to sweep; 0: max")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256, help="each request: uniform [m/2, m]")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--sub-batch", type=int, default=64)
    ap.add_argument("--eos-every", type=int, default=3, help="every k-th prompt ends with EOS")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window per point")
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--target", type=float, default=TARGET)
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from transformers import AutoTokenizer

    from tests.support.models import smollm2_model, tiny_model
    from workers.engines.stub_executor import StubExecutor, stub_config
    from workers.engines.vllm_engine import VllmEngine

    model = smollm2_model() if args.model == "smollm2" else tiny_model()
    stream = token_stream(AutoTokenizer.from_pretrained(model))
    rng = random.Random(0)
    prompts = []
    for _ in range(256):
        start = rng.randrange(len(stream) - args.prompt_tokens)
        prompts.append(stream[start : start + args.prompt_tokens])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    steps = [float(x) for x in args.step_ms.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="docqueue-frontend-"))
    benches: list[Bench] = []
    for mode in modes:
        control = tmp / f"{mode}.step_ms"
        control.write_text("0")
        # The stub allocates no KV cache: a large one keeps every sequence running.
        extra = stub_config(
            stream, eos_every=args.eos_every, kv_cache_gib=KV_GIB, control_path=str(control)
        )
        engine = VllmEngine(
            model,
            max_model_len=args.prompt_tokens + args.max_tokens + 16,
            max_num_seqs=args.max_num_seqs,
            kv_cache_gib=KV_GIB,
            outputs=mode,
            engine_args={"distributed_executor_backend": StubExecutor, "additional_config": extra},
        )
        benches.append(Bench(mode, engine, control, TokenCounter(engine)))
        print(f"{mode}: engine ready in {engine.start_s:.1f} s", flush=True)
    print(
        f"model {args.model} ({len(stream)} stream tokens), max_num_seqs {args.max_num_seqs}, "
        f"prompts {args.prompt_tokens} tokens, max_tokens [{args.max_tokens // 2}, "
        f"{args.max_tokens}], {args.seconds:g} s a point, host {os.cpu_count()} CPUs",
        flush=True,
    )
    points: list[Point] = []
    try:
        warm = argparse.Namespace(**{**vars(args), "seconds": 1.0, "warmup_s": 1.0})
        for bench in benches:  # the first requests of each engine, out of the measurements
            measure(bench, 0, prompts, warm)
        for step_ms in steps:
            for bench in benches:
                p = measure(bench, step_ms, prompts, args)
                points.append(p)
                print(
                    f"  {p.mode:<6} step {step_ms:g} ms: {p.delivered:,.0f} tok/s delivered, "
                    f"{p.us_per_token:.1f} µs front-end CPU a token",
                    flush=True,
                )
    finally:
        for bench in benches:
            bench.engine.close()
    report(points)
    print()
    ceilings: dict[str, float] = {}
    for mode in modes:
        busiest = max((p for p in points if p.mode == mode), key=lambda p: p.delivered)
        ceilings[mode] = busiest.ceiling
        print(
            f"{mode}: front-end ceiling {busiest.ceiling:,.0f} output tok/s "
            f"({busiest.us_per_token:.1f} µs a token at its busiest point, "
            f"{busiest.delivered:,.0f} tok/s delivered there)"
        )
    if "final" in ceilings and "stream" in ceilings:
        print(f"final/stream ceiling: {ceilings['final'] / ceilings['stream']:.2f}x")
    design = ceilings.get("final", max(ceilings.values()))
    verdict = "PASS" if design >= args.target else "MISS"
    print(f"{verdict}: the design's front-end ceiling {design:,.0f} vs target {args.target:,.0f}")
    return 0 if design >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
