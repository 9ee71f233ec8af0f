"""Raw vLLM ``LLM.chat``: the reference docqueue's outputs must equal.

Run as a script (vLLM spawns its engine process; the engine must not be built at import):
    python -m tests.support.raw_vllm IN.json OUT.json
IN.json: {"model": ..., "runs": [{"texts": [...], "max_tokens": N, "temperature": T,
          "seed": S|null, "budget_tokens": B|null}, ...]}
OUT.json: [{"outputs": [...], "truncated": [bool, ...]}, ...], one entry per run.

With ``budget_tokens``, a text whose chat prompt is longer keeps the longest prefix of its
tokens whose prompt fits, found by bisection here with vLLM's own tokenizer: the documented
truncation rule, computed independently of docqueue's code.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _prompt_len(tokenizer: Any, text: str) -> int:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True
    )
    if not isinstance(ids, list):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


def truncate(tokenizer: Any, text: str, budget: int) -> tuple[str, bool]:
    if _prompt_len(tokenizer, text) <= budget:
        return text, False
    ids = tokenizer(text, add_special_tokens=False).input_ids

    def cut(k: int) -> str:
        return str(tokenizer.decode(ids[:k], skip_special_tokens=True))

    lo, hi = 0, len(ids)  # prompt of ids[:lo] fits (0: assumed), ids[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _prompt_len(tokenizer, cut(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return cut(lo), True


def main(src: str, dst: str) -> None:
    from vllm import LLM, SamplingParams

    with open(src) as f:
        spec = json.load(f)
    from workers.engines.vllm_engine import engine_kwargs

    # The very engine configuration of a CPU docqueue worker (workers/engines/vllm_engine.py)
    # as tests run it: eager (tests/support/stack.py), whose outputs compiled ones may not equal.
    llm = LLM(**engine_kwargs(spec["model"], device="cpu", enforce_eager=True))
    tokenizer = llm.get_tokenizer()
    answers = []
    for run in spec["runs"]:
        budget = run.get("budget_tokens")
        cuts = [truncate(tokenizer, t, budget) if budget else (t, False) for t in run["texts"]]
        params = SamplingParams(
            max_tokens=run["max_tokens"], temperature=run["temperature"], seed=run.get("seed")
        )
        messages: Any = [[{"role": "user", "content": text}] for text, _ in cuts]
        outs = llm.chat(messages, params, use_tqdm=False)
        answers.append(
            {"outputs": [o.outputs[0].text for o in outs], "truncated": [t for _, t in cuts]}
        )
    with open(dst, "w") as f:
        json.dump(answers, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
