"""The CLI and OpenAI batch files: `docqueue submit requests.jsonl` makes a batch of it (as the
OpenAI SDK would), follows it with the bar, and `docqueue results batch_... --format openai`
writes its output and error lines, every request once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openai.types.chat import ChatCompletion

from service.settings import Settings
from tests.support.stack import cli, cli_env, new_key


def test_submit_a_batch_file_wait_and_write_its_openai_lines(
    settings: Settings, api_server: str, tiny_worker: Any, tmp_path: Path
) -> None:
    env = cli_env(settings, api_server, new_key(settings, api_server))
    lines: list[dict[str, Any]] = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "max_tokens": 6, "temperature": 0,
                  "messages": [{"role": "user", "content": f"Question {i}?"}]}}
        for i in range(12)
    ]  # fmt: skip
    lines.append({**lines[0], "custom_id": "refused", "body": {**lines[0]["body"], "tools": []}})
    src = tmp_path / "requests.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))

    refused = cli("submit", str(src), "--task", "generate", env=env)
    assert refused.returncode != 0 and "drop --task" in refused.stderr

    done = cli("submit", str(src), "--wait", "--poll-s", "0.3", env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    batch_id = next(w for w in done.stdout.split() if w.startswith("batch_"))
    assert f"batch {batch_id} completed" in done.stdout

    out = tmp_path / "out.jsonl"
    wrote = cli("results", batch_id, "--format", "openai", "-o", str(out), env=env)
    assert wrote.returncode == 0, wrote.stderr
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in got) == sorted(x["custom_id"] for x in lines)
    for x in got:
        if x["custom_id"] == "refused":
            assert x["response"]["status_code"] == 400
        else:
            ChatCompletion.model_validate(x["response"]["body"])
