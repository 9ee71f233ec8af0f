"""`docqueue run` against raw vLLM (issue 15): the same prompts, side by side in one run.

  (a) raw vLLM: a fresh process runs ``LLM(model, seed=0)`` (vLLM's defaults), then one timed
      ``LLM.generate`` of every prompt in one call. The prompts are the token ids docqueue's
      worker renders for the same documents (``workers.prompts.render``, task generate), so
      both sides decode the same sequences.
  (c) ``docqueue run docs.csv --task generate -o out.csv`` as a user runs it (no server, its
      defaults), timed from its first chunk's claim to its job's end (the state file's
      ``started_at`` and ``finished_at``): engine start excluded, as on (a).

Rounds alternate the order; each side has the machine to itself. Both sides get
``VLLM_CPU_KVCACHE_SPACE=2`` (the KV cache a default worker takes on CPU). The run exits 1
unless the median c/a of output tokens/s is at least 0.97.

    .venv/bin/python scripts/bench/run.py                      # tiny, 4,000 docs x 64, 3 rounds
    .venv/bin/python scripts/bench/run.py --docs 600 --rounds 1   # a quick look

Not measured yet: ``vllm run-batch`` on the same requests (it needs OpenAI batch files as
``docqueue run`` input, which issue 15 has still to add).
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


def run_raw(model: str, prompts: list[list[int]], max_tokens: int, work: Path) -> dict[str, Any]:
    spec = work / "spec.json"
    spec.write_text(json.dumps({"model": model, "prompts": prompts, "max_tokens": max_tokens}))
    done = subprocess.run(
        [sys.executable, __file__, "--raw-side", str(spec)],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    for line in done.stdout.splitlines():
        if line.startswith(REPLY):
            return dict(json.loads(line[len(REPLY) :]))
    raise RuntimeError(f"raw vLLM failed:\n{done.stderr[-3000:]}")


def run_docqueue(model: str, csv_path: Path, max_tokens: int, work: Path) -> dict[str, Any]:
    out = work / "out.csv"
    store = work / "out.csv.docqueue.sqlite"
    for p in work.glob("out.csv*"):
        p.unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCQUEUE_")}
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("docqueue")),
            *("run", str(csv_path), "-o", str(out), "--task", "generate", "--model", model),
            *("--max-tokens", str(max_tokens), "--temperature", "0"),
        ],
        env={**env, **ENV, "DOCQUEUE_DEFAULT_MODEL": model},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"docqueue run failed:\n{done.stderr[-3000:]}")
    with sqlite3.connect(store) as conn:
        started, finished, tokens = conn.execute(
            "SELECT started_at, finished_at, completion_tokens FROM jobs"
        ).fetchone()
    return {"secs": finished - started, "tokens": int(tokens)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | a model path")
    p.add_argument("--docs", type=int, default=4000)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--raw-side", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.raw_side:
        raw_side(args.raw_side)
        return 0

    from scripts import prepare_models
    from scripts.bench.saturation import documents

    model = {
        "tiny": prepare_models.ensure_tiny_model,
        "smollm2": prepare_models.ensure_smollm2,
    }.get(args.model, lambda: Path(args.model))()
    texts = documents(args.docs)
    prompts = prompts_for(str(model), texts)
    rows = []
    with tempfile.TemporaryDirectory(prefix="docqueue-run-bench-") as tmp:
        work = Path(tmp)
        csv_path = work / "docs.csv"
        csv_path.write_text("text\n" + "".join(f"{t}\n" for t in texts))
        for n in range(args.rounds):
            order = "ac" if n % 2 == 0 else "ca"
            got: dict[str, dict[str, Any]] = {}
            for side in order:
                if side == "a":
                    got["a"] = run_raw(str(model), prompts, args.max_tokens, work)
                else:
                    got["c"] = run_docqueue(str(model), csv_path, args.max_tokens, work)
            a, c = got["a"], got["c"]
            if a["tokens"] != c["tokens"]:
                print(f"note: output tokens differ, raw {a['tokens']} docqueue {c['tokens']}")
            ratio = (c["tokens"] / c["secs"]) / (a["tokens"] / a["secs"])
            rows.append(ratio)
            a_tps, c_tps = a["tokens"] / a["secs"], c["tokens"] / c["secs"]
            print(
                f"round {n + 1}/{args.rounds} ({','.join(order)}): raw {a_tps:,.0f} tok/s in"
                f" {a['secs']:.2f} s; docqueue run {c_tps:,.0f} tok/s in {c['secs']:.2f} s;"
                f" c/a {ratio:.3f}",
                flush=True,
            )
    median = statistics.median(rows)
    print(
        f"{model.name}, {args.docs} documents x max_tokens {args.max_tokens}, temperature 0: "
        f"c/a per round {', '.join(f'{r:.3f}' for r in rows)}; median {median:.3f} "
        f"(target >= {TARGET}): {'PASS' if median >= TARGET else 'MISS'}"
    )
    return 0 if median >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
