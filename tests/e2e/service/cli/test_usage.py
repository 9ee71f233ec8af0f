"""`docqueue usage`, `keys create --admin` and the admin commands as people run them, against a
real `docqueue api` process; results are written through the real chunk store."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from service.settings import Settings
from service.store.chunks import RowResult
from tests.support.runs import run_job
from tests.support.stack import cli, cli_env, new_key, post_job


def _admin_key(settings: Settings, api_server: str) -> str:
    tenant = f"ops-{uuid.uuid4().hex[:6]}"
    done = cli("keys", "create", "--tenant", tenant, "--admin", env=cli_env(settings, api_server))
    assert done.returncode == 0, done.stderr
    assert "Admin API key" in done.stderr and "not shown again" in done.stderr
    return done.stdout.strip()


def test_usage_quotas_and_admin_commands(
    settings: Settings, api_server: str, tmp_path: Path
) -> None:
    key = new_key(settings, api_server)
    admin = _admin_key(settings, api_server)
    mine, ops = cli_env(settings, api_server, key), cli_env(settings, api_server, admin)
    model = f"usage-{uuid.uuid4().hex[:6]}"
    job = post_job(api_server, key, "text\na\nb\nc\n", task="summarize", model=model)
    run_job(
        settings, job["id"], lambda idx: RowResult(idx=idx, prompt_tokens=7, completion_tokens=idx)
    )

    table = cli("usage", env=mine)
    assert table.returncode == 0, table.stderr
    assert model in table.stdout and "total" in table.stdout and "running_jobs" in table.stdout
    body = json.loads(cli("usage", "--json", "--group-by", "model", env=mine).stdout)
    assert [r["model"] for r in body["data"]] == [model]
    assert body["totals"]["prompt_tokens"] == 21 and body["totals"]["output_tokens"] == 6
    tenant = body["tenant"]

    # A tenant key cannot use the admin commands, and says why in one line.
    for args in (("tenants",), ("workers",), ("queues",), ("quotas", "show", tenant)):
        denied = cli(*args, env=mine)
        assert denied.returncode == 1 and "admin key" in denied.stderr, args
        assert "Traceback" not in denied.stderr
    keys = json.loads(cli("keys", "list", "--tenant", tenant, "--json", env=mine).stdout)
    assert [k["admin"] for k in keys] == [False]

    # An admin sets a quota; the tenant's next submission past it is refused, naming it.
    done = cli("quotas", "set", tenant, "--running-jobs", "1", env=ops)
    assert done.returncode == 0, done.stderr
    assert "running_jobs" in done.stdout and "tenant's own" in done.stdout
    post_job(api_server, key, "text\nx\n", task="summarize", model=model)  # open: 1 of 1
    src = tmp_path / "more.csv"
    src.write_text("text\ny\n")
    refused = cli("submit", str(src), "--task", "summarize", "--model", model, env=mine)
    assert refused.returncode == 1
    assert "quota running_jobs exceeded" in refused.stderr and "HTTP 429" in refused.stderr

    shown = json.loads(cli("quotas", "show", tenant, "--json", env=ops).stdout)
    assert shown["quotas"]["running_jobs"] == {"limit": 1, "used": 1, "default": False}
    assert tenant in cli("tenants", env=ops).stdout
    assert cli("quotas", "set", tenant, "--reset", "running-jobs", env=ops).returncode == 0
    listed = json.loads(cli("usage", "--json", "--tenant", tenant, env=ops).stdout)
    assert listed["tenant"] == tenant
    assert listed["totals"]["output_tokens"] == body["totals"]["output_tokens"]
    assert listed["totals"]["upload_bytes"] == len(b"text\na\nb\nc\n") + len(b"text\nx\n")
    everyone = json.loads(cli("usage", "--json", env=ops).stdout)
    assert tenant in {r["tenant"] for r in everyone["data"]}
    queues = json.loads(cli("queues", "--json", env=ops).stdout)["data"]
    assert next(q for q in queues if q["model"] == model)["open_jobs"] == 1
    assert cli("workers", env=ops).returncode == 0
