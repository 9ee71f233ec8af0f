"""`docqueue files` and the official `openai` SDK against a real `docqueue api` process (real
HTTP, real multipart spooling): what one uploads the other sees, byte for byte, and the
errors read as one line (CLI) or the SDK's own exception (SDK)."""

from __future__ import annotations

import json
from pathlib import Path

import openai

from service.settings import Settings
from tests.support.stack import cli, cli_env, new_key


def test_files_upload_list_get_and_rm_with_the_sdk_alongside(
    settings: Settings, api_server: str, tmp_path: Path
) -> None:
    key = new_key(settings, api_server)
    env = cli_env(settings, api_server, key)
    data = b"".join(f'{{"custom_id": "r{i}", "body": {{}}}}\n'.encode() for i in range(2000))
    src = tmp_path / "requests.jsonl"
    src.write_bytes(data)

    up = cli("files", "upload", str(src), "--expires-after-s", "7200", "--json", env=env)
    assert up.returncode == 0, up.stderr
    made = json.loads(up.stdout)
    assert made["bytes"] == len(data) and made["expires_at"] == made["created_at"] + 7200

    sdk = openai.OpenAI(base_url=f"{api_server}/v1", api_key=key)
    assert sdk.files.retrieve(made["id"]).filename == "requests.jsonl"
    assert sdk.files.content(made["id"]).content == data
    also = sdk.files.create(file=("second.jsonl", b"{}\n"), purpose="batch")

    listed = cli("files", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert made["id"] in listed.stdout and also.id in listed.stdout
    assert listed.stdout.index(also.id) < listed.stdout.index(made["id"])  # newest first

    got = cli("files", "get", made["id"], "-o", str(tmp_path / "copy.jsonl"), env=env)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "copy.jsonl").read_bytes() == data

    assert cli("files", "rm", made["id"], env=env).returncode == 0
    missing = cli("files", "get", made["id"], env=env)
    assert missing.returncode == 1 and "No such File object" in missing.stderr
    assert "Traceback" not in missing.stderr
    try:
        sdk.files.retrieve(made["id"])
    except openai.NotFoundError as exc:
        assert exc.body == {
            "message": f"No such File object: {made['id']}",
            "type": "invalid_request_error",
            "param": "file_id",
            "code": "not_found",
        }
    else:
        raise AssertionError("a deleted file was found")
    bad = cli("files", "upload", str(src), "--expires-after-s", "5", env=env)
    assert bad.returncode == 1 and "expires_after[seconds]" in bad.stderr
