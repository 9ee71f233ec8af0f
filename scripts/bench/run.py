"""`docqueue run` against raw vLLM and `vllm run-batch` (issue 15), side by side in one run.

  (a) raw vLLM: a fresh process runs ``LLM(model, seed=0)`` (vLLM's defaults), then one timed
      ``LLM.generate`` of every prompt in one call. The prompts are the token ids docqueue's
      worker renders for the same documents (``workers.prompts.render``, task generate), so
      both sides decode the same sequences.
  (c) ``docqueue run docs.csv --task generate -o out.csv`` as a user runs it (no server, its
      defaults), timed from its first chunk's claim to its job's end (the state file's
      ``started_at`` and ``finished_at``): engine start excluded, as on (a).
  (b) ``vllm run-batch -i requests.jsonl -o out.jsonl --model M --seed 0`` on an OpenAI batch
      file of the same documents (``/v1/chat/completions``, one user message each, temperature
      0): vLLM's own batch runner (``vllm.entrypoints.launchers.run_batch.main``, which the
      ``vllm run-batch`` command calls), timed from when its engine is up (its ``run_batch``
      coroutine, wrapped with a clock) to its output file written.
  (d) ``docqueue run requests.jsonl -o out.jsonl`` on that file, timed from its first chunk's
      claim to its output file written (the file's modification time).

Rounds rotate the order; each side has the machine to itself. Every side gets
``VLLM_CPU_KVCACHE_SPACE=2`` (the KV cache a default worker takes on CPU). The run exits 1
unless the median c/a of output tokens/s is at least 0.97 and the median d/b above 1.

    .venv/bin/python scripts/bench/run.py                      # tiny, 6,000 docs x 64, 3 rounds
    .venv/bin/python scripts/bench/run.py --docs 600 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET = 0.97
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
REPLY = "@@run-bench "


def raw_side(spec_path: str) -> None:
    """Child process (a): build the engine, generate every prompt in one call, print the time."""
    from vllm import LLM, SamplingParams, TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    llm = LLM(model=spec["model"], seed=0, disable_log_stats=True)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    prompts: Any = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up, not timed
    started = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    secs = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(REPLY + json.dumps({"secs": secs, "tokens": tokens}), flush=True)


def run_batch_side(spec_path: str) -> None:
    """Child process (b): vLLM's batch runner as ``vllm run-batch`` runs it, its ``run_batch``
    (everything after the engine is built) timed."""
    import asyncio

    from vllm.entrypoints.launchers import run_batch as rb

    spec = json.loads(Path(spec_path).read_text())
    inner = rb.run_batch

    async def timed(engine_client: Any, args: Any) -> None:
        started = time.perf_counter()
        await inner(engine_client, args)
        secs = time.perf_counter() - started
        print(REPLY + json.dumps({"secs": secs}), flush=True)

    rb.run_batch = timed
    sys.argv = [
        "vllm-run-batch",
        *("-i", spec["input"], "-o", spec["output"], "--model", spec["model"], "--seed", "0"),
    ]
    asyncio.run(rb.main(rb.parse_args()))  # type: ignore[no-untyped-call]


def batch_file(texts: list[str], model: str, max_tokens: int) -> str:
    """The same documents as an OpenAI batch file: one chat request each, greedy."""
    return "".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": t}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                },
            }
        )
        + "\n"
        for i, t in enumerate(texts)
    )


def output_tokens(path: Path) -> tuple[int, int]:
    """(lines that succeeded, their output tokens) in an OpenAI batch output file."""
    ok = tokens = 0
    for line in path.read_text().splitlines():
        x = json.loads(line)
        resp = x.get("response") or {}
        if x.get("error") is None and resp.get("status_code") == 200:
            ok += 1
            tokens += int(resp["body"]["usage"]["completion_tokens"])
    return ok, tokens


def run_vllm_batch(model: str, requests: Path, work: Path) -> dict[str, Any]:
    out = work / "vllm-out.jsonl"
    out.unlink(missing_ok=True)
    spec = {"model": model, "input": str(requests), "output": str(out)}
    got = side("--run-batch-side", spec, work, "vllm run-batch")
    ok, tokens = output_tokens(out)
    return {**got, "tokens": tokens, "ok": ok}


def prompts_for(model: str, texts: list[str]) -> list[list[int]]:
    """What docqueue's worker sends the engine for these documents (task generate)."""
    from transformers import AutoTokenizer

    from service.store.chunks import Doc
    from workers.prompts import render

    tok = AutoTokenizer.from_pretrained(model)
    return [
        render(tok, "generate", {}, Doc(i + 1, None, t, None), 1_000_000).token_ids
        for i, t in enumerate(texts)
    ]


def side(flag: str, spec: dict[str, Any], work: Path, what: str) -> dict[str, Any]:
    """Runs one side in a fresh process of this script and returns what it printed."""
    path = work / f"{flag.strip('-')}.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, __file__, flag, str(path)],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    for line in done.stdout.splitlines():
        if line.startswith(REPLY):
            return dict(json.loads(line[len(REPLY) :]))
    raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")


def run_raw(model: str, prompts: list[list[int]], max_tokens: int, work: Path) -> dict[str, Any]:
    spec = {"model": model, "prompts": prompts, "max_tokens": max_tokens}
    return side("--raw-side", spec, work, "raw vLLM")


def job_clock(store: Path) -> tuple[float, float, int]:
    """A finished ``docqueue run``'s first claim and end (its state file's clock) and its output
    tokens."""
    with sqlite3.connect(store) as conn:
        started, finished, tokens = conn.execute(
            "SELECT started_at, finished_at, completion_tokens FROM jobs"
        ).fetchone()
    return float(started), float(finished), int(tokens)


def run_docqueue(
    model: str, src: Path, max_tokens: int, work: Path, *options: str
) -> dict[str, Any]:
    """``docqueue run`` on a CSV of documents (timed to its job's end) or on an OpenAI batch
    file (timed to its output file written), with ``options`` beyond the task's."""
    batch = src.suffix == ".jsonl"
    out = work / ("dq-out.jsonl" if batch else "dq-out.csv")
    store = out.with_name(out.name + ".docqueue.sqlite")
    for p in work.glob("dq-out*"):
        p.unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCQUEUE_")}
    argv = [str(Path(sys.executable).with_name("docqueue")), "run", str(src), "-o", str(out)]
    if not batch:  # a batch file's requests say it all
        argv += ["--task", "generate", "--model", model, "--temperature", "0"]
        argv += ["--max-tokens", str(max_tokens)]
    argv += options
    done = subprocess.run(
        argv,
        env={**env, **ENV, "DOCQUEUE_DEFAULT_MODEL": model},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"docqueue run failed:\n{done.stderr[-3000:]}")
    started, finished, tokens = job_clock(store)
    if batch:
        ok, _ = output_tokens(out)
        return {"secs": out.stat().st_mtime - started, "tokens": int(tokens), "ok": ok}
    return {"secs": finished - started, "tokens": int(tokens)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | a model path")
    p.add_argument("--docs", type=int, default=6000)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sides", default="acbd", help="which sides run (default all: acbd)")
    p.add_argument("--raw-side", help=argparse.SUPPRESS)
    p.add_argument("--run-batch-side", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.raw_side:
        raw_side(args.raw_side)
        return 0
    if args.run_batch_side:
        run_batch_side(args.run_batch_side)
        return 0

    from scripts import prepare_models
    from scripts.bench.saturation import documents

    model = {
        "tiny": prepare_models.ensure_tiny_model,
        "smollm2": prepare_models.ensure_smollm2,
    }.get(args.model, lambda: Path(args.model))()
    texts = documents(args.docs)
    sides = [x for x in "acbd" if x in args.sides]
    ratios: dict[str, list[float]] = {"c/a": [], "d/b": []}
    with tempfile.TemporaryDirectory(prefix="docqueue-run-bench-") as tmp:
        work = Path(tmp)
        csv_path = work / "docs.csv"
        csv_path.write_text("text\n" + "".join(f"{t}\n" for t in texts))
        requests = work / "requests.jsonl"
        requests.write_text(batch_file(texts, str(model), args.max_tokens))
        prompts = prompts_for(str(model), texts) if "a" in sides else []
        run = {
            "a": lambda: run_raw(str(model), prompts, args.max_tokens, work),
            "c": lambda: run_docqueue(str(model), csv_path, args.max_tokens, work),
            "b": lambda: run_vllm_batch(str(model), requests, work),
            "d": lambda: run_docqueue(str(model), requests, args.max_tokens, work),
        }
        names = {
            "a": "raw LLM.generate",
            "c": "docqueue run (CSV)",
            "b": "vllm run-batch",
            "d": "docqueue run (batch file)",
        }
        for n in range(args.rounds):
            order = sides[n % len(sides) :] + sides[: n % len(sides)]
            got: dict[str, dict[str, Any]] = {}
            for side in order:
                got[side] = run[side]()
                g = got[side]
                print(
                    f"round {n + 1}/{args.rounds} {names[side]}: {g['tokens'] / g['secs']:,.0f}"
                    f" output tok/s ({g['tokens']:,} tokens in {g['secs']:.2f} s"
                    + (f", {g['ok']:,} requests ok" if "ok" in g else "")
                    + ")",
                    flush=True,
                )
            for pair in ratios:
                top, bottom = pair.split("/")
                if top in got and bottom in got:
                    t, b = got[top], got[bottom]
                    if t["tokens"] != b["tokens"]:
                        print(f"  note: output tokens differ, {top} {t['tokens']:,}"
                              f" {bottom} {b['tokens']:,}")  # fmt: skip
                    ratio = (t["tokens"] / t["secs"]) / (b["tokens"] / b["secs"])
                    ratios[pair].append(ratio)
                    print(f"  {pair} {ratio:.3f}", flush=True)
    passed = True
    for pair, target, strict in (("c/a", TARGET, False), ("d/b", 1.0, True)):
        if not ratios[pair]:
            continue
        median = statistics.median(ratios[pair])
        ok = median > target if strict else median >= target
        passed = passed and ok
        print(
            f"{model.name}, {args.docs} documents x max_tokens {args.max_tokens}, temperature 0:"
            f" {pair} per round {', '.join(f'{r:.3f}' for r in ratios[pair])}; median"
            f" {median:.3f} (target {'>' if strict else '>='} {target}):"
            f" {'PASS' if ok else 'MISS'}"
        )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
