"""Raw vLLM ``LLM.chat`` over the given conversations: the reference docqueue must match.

Run as a script (vLLM spawns its engine process; the engine must not be built at import):
    python -m tests.e2e.raw_vllm IN.json OUT.json
IN.json: {"model": ..., "messages": [[{"role": "user", "content": ...}], ...],
          "max_tokens": N, "temperature": T, "seed": S|null}
"""

from __future__ import annotations

import json
import sys


def main(src: str, dst: str) -> None:
    from vllm import LLM, SamplingParams

    with open(src) as f:
        spec = json.load(f)
    # The same engine settings as a CPU docqueue worker (seed 0, eager on CPU).
    llm = LLM(model=spec["model"], seed=0, enforce_eager=spec.get("enforce_eager", True))
    params = SamplingParams(
        max_tokens=spec["max_tokens"], temperature=spec["temperature"], seed=spec.get("seed")
    )
    outs = llm.chat(spec["messages"], params, use_tqdm=False)
    with open(dst, "w") as f:
        json.dump([o.outputs[0].text for o in outs], f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
