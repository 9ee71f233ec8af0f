"""The transformers engine against the loops people write by hand (issue 16), side by side.

On the same prompts (the token ids docqueue's worker renders for the same documents, task
generate), greedy, the same ``max_new_tokens``, one model loaded once in this process:

  (a) one prompt at a time: ``model.generate(ids)`` per document, as most tutorials do;
  (b) fixed batches of 8 in input order, left-padded, one ``model.generate`` each;
  (c) docqueue's ``TransformersEngine``: every prompt submitted at once, the engine sorts by
      length and sizes its batches by the token budget (its defaults);
  (d) ``docqueue run --engine transformers`` as a user runs it (a fresh process, its defaults),
      timed from its first chunk's claim to its job's end (the state file's clock): model
      loading excluded, as on (a) to (c).

Output tokens/s are counted from what each side generated. The run exits 1 unless (c) is at
least 3x (a) and at least (b), and (d) at least 0.9x (c).

    .venv/bin/python scripts/bench/transformers_engine.py               # tiny and SmolLM2-135M
    .venv/bin/python scripts/bench/transformers_engine.py --model tiny --docs 64   # quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LOOP_TARGET = 3.0  # (c) against (a)
FIXED_TARGET = 1.0  # (c) against (b)
RUN_TARGET = 0.9  # (d) against (c)
SIZES = {"tiny": (512, 32), "smollm2": (128, 32)}  # documents, max_new_tokens


def prompts_for(tok: Any, texts: list[str]) -> list[list[int]]:
    from service.store.chunks import Doc
    from workers.prompts import render

    return [
        render(tok, "generate", {}, Doc(i + 1, None, t, None), 1_000_000).token_ids
        for i, t in enumerate(texts)
    ]


def new_tokens(rows: list[list[int]], eos: set[int]) -> int:
    """Tokens generated, each row up to and including its first EOS (the padding after it is
    not output)."""
    total = 0
    for row in rows:
        end = next((k for k, t in enumerate(row) if t in eos), None)
        total += len(row) if end is None else end + 1
    return total


def plain_batches(engine: Any, prompts: list[list[int]], size: int, max_new: int) -> int:
    """(a) with ``size`` 1, (b) with 8: ``model.generate`` on batches in input order."""
    import torch

    from workers.engines.transformers_engine import pad_rows

    model, pad, eos = engine._model, engine._pad, set(engine._eos)
    total = 0
    for start in range(0, len(prompts), size):
        ids, mask = pad_rows(prompts[start : start + size], pad, engine.device)
        width = ids.shape[1]
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=pad,
            )
        total += new_tokens(out[:, width:].tolist(), eos)
    return total


def engine_side(engine: Any, prompts: list[list[int]], max_new: int) -> int:
    from workers.engines.base import GenRequest

    batch = engine.submit([GenRequest(prompt_token_ids=p, max_tokens=max_new) for p in prompts])
    if not batch.wait(3600):
        raise RuntimeError("the engine did not finish")
    return sum(r.completion_tokens for r in batch.results if r is not None)


def run_side(model: str, texts: list[str], max_new: int, work: Path) -> tuple[float, int]:
    from scripts.bench.run import run_docqueue

    src = work / "docs.csv"
    src.write_text("text\n" + "".join(f"{t}\n" for t in texts))
    got = run_docqueue(model, src, max_new, work, "--engine", "transformers")
    return float(got["secs"]), int(got["tokens"])


def bench(name: str, path: Path, docs: int, max_new: int) -> bool:
    from scripts.bench.saturation import documents
    from workers.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(str(path))
    texts = documents(docs)
    prompts = prompts_for(engine.tokenizer(), texts)
    engine_side(engine, prompts[:8], max_new)  # warm-up, not timed
    rates: dict[str, float] = {}
    sides: dict[str, tuple[str, Callable[[], int]]] = {
        "a": ("one prompt at a time", lambda: plain_batches(engine, prompts, 1, max_new)),
        "b": ("fixed batches of 8", lambda: plain_batches(engine, prompts, 8, max_new)),
        "c": ("TransformersEngine", lambda: engine_side(engine, prompts, max_new)),
    }
    for key, (label, fn) in sides.items():
        started = time.perf_counter()
        tokens = fn()
        secs = time.perf_counter() - started
        rates[key] = tokens / secs
        print(
            f"{name} {label}: {docs / secs:,.1f} docs/s, {rates[key]:,.0f} output tok/s"
            f" ({tokens:,} tokens in {secs:.2f} s)",
            flush=True,
        )
    engine.close()
    with tempfile.TemporaryDirectory(prefix="docqueue-tf-bench-") as tmp:
        secs, tokens = run_side(str(path), texts, max_new, Path(tmp))
    rates["d"] = tokens / secs
    print(
        f"{name} docqueue run --engine transformers: {docs / secs:,.1f} docs/s,"
        f" {rates['d']:,.0f} output tok/s ({tokens:,} tokens in {secs:.2f} s)",
        flush=True,
    )
    c_a, c_b, d_c = rates["c"] / rates["a"], rates["c"] / rates["b"], rates["d"] / rates["c"]
    ok = c_a >= LOOP_TARGET and c_b >= FIXED_TARGET and d_c >= RUN_TARGET
    print(
        f"{name}, {docs} documents x {max_new} new tokens, greedy: engine vs one-at-a-time"
        f" {c_a:.2f}x (target >= {LOOP_TARGET}), vs fixed 8 {c_b:.2f}x (target >="
        f" {FIXED_TARGET}); docqueue run vs engine {d_c:.2f} (target >= {RUN_TARGET}):"
        f" {'PASS' if ok else 'MISS'}",
        flush=True,
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2", "both"], default="both")
    p.add_argument("--docs", type=int, help="documents (default: 512 tiny, 128 SmolLM2)")
    p.add_argument("--max-tokens", type=int, help="new tokens a document (default: 32)")
    args = p.parse_args(argv)

    from scripts import prepare_models

    builders = {"tiny": prepare_models.ensure_tiny_model, "smollm2": prepare_models.ensure_smollm2}
    names = ["tiny", "smollm2"] if args.model == "both" else [args.model]
    results = []
    for name in names:
        docs, max_new = SIZES[name]
        results.append(bench(name, builders[name](), args.docs or docs, args.max_tokens or max_new))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
