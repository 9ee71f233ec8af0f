"""``docqueue run`` on the zero-cost bench engine (``DOCQUEUE_ENGINE=bench``): the command's
own behaviour (state file, fingerprint, restart, errors, output), fast. The real-engine run,
killed and resumed, is ``tests/e2e/service/cli/test_run.py``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app, output
from service.settings import get_settings

MODEL = "bench-zero-cost"


@pytest.fixture(autouse=True)
def bench_engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DOCQUEUE_ENGINE", "bench")
    monkeypatch.setenv("DOCQUEUE_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:9/x")
    monkeypatch.setenv("DOCQUEUE_REDIS_URL", "redis://127.0.0.1:9/0")
    for console in (output.out, output.err):  # no wrapping at 80 columns inside messages
        monkeypatch.setattr(console, "width", 10_000)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def make_input(path: Path, n: int) -> Path:
    rows = "".join(f"r{i},text number {i},{i % 2}\n" for i in range(1, n + 1))
    path.write_text(f"id,text,half\n{rows}")
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", *args])
    return result.exit_code, result.output


def test_a_run_writes_every_row_in_input_order_and_a_rerun_refuses_other_options(
    tmp_path: Path,
) -> None:
    src = make_input(tmp_path / "in.csv", 300)
    out = tmp_path / "out.jsonl"
    base = [str(src), "-o", str(out), "--task", "generate", "--model", MODEL, "--id-column", "id"]
    code, text = run(*base, "--chunk-size", "16")
    assert code == 0, text
    assert "completed: 300 rows" in text and f"{out}.docqueue.sqlite" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(1, 301)]
    assert {r["output"] for r in rows} == {"ok"} and rows[0]["prompt_tokens"] == 3

    out.unlink()  # the same run again: nothing to run, the output is written again
    code, text = run(*base, "--chunk-size", "16")
    assert code == 0 and "continuing the earlier run" in text and out.exists()

    code, text = run(*base, "--chunk-size", "32")
    assert code == 1 and "another input or other options" in text and "--restart" in text
    make_input(src, 301)
    code, text = run(*base, "--chunk-size", "16")
    assert code == 1 and "another input" in text

    code, text = run(*base, "--chunk-size", "32", "--restart")
    assert code == 0 and "completed: 301 rows" in text


def test_bad_input_and_options_are_refused_before_anything_runs(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("id,text\na,x\nb,y\na,z\n")
    out = tmp_path / "out.csv"
    code, text = run(str(src), "-o", str(out), "--task", "generate", "--id-column", "id")
    assert code == 1 and "row 3: duplicate id 'a'" in text
    code, text = run(str(src), "-o", str(out), "--task", "classify", "--labels", "x")
    assert code == 1 and "at least two labels" in text
    code, text = run(str(src), "-o", str(tmp_path / "out.xlsx"), "--task", "generate")
    assert code == 1 and ".csv, .jsonl or .parquet" in text
    assert not out.exists()


def test_csv_output_and_classify_labels(tmp_path: Path) -> None:
    src = make_input(tmp_path / "in.csv", 20)
    out = tmp_path / "out.csv"
    code, text = run(
        str(src), "-o", str(out), "--task", "classify", "--labels", "yes,no", "--model", MODEL
    )
    assert code == 0, text
    rows = list(csv.DictReader(out.open(newline="")))
    assert [r["id"] for r in rows] == [str(i) for i in range(1, 21)]  # no id column: the row
    assert {(r["label"], r["confidence"]) for r in rows} == {("yes", "1.0")}


SERVICE_ONLY = {"celery", "kombu", "psycopg", "redis", "vllm"}


def imported_in_a_run(args: list[str], env: dict[str, str]) -> list[str]:
    """Runs ``docqueue run ARGS`` in a fresh interpreter; which of ``SERVICE_ONLY`` it imported."""
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from service.cli import app\n"
        f"r = CliRunner().invoke(app, ['run', *{args!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {SERVICE_ONLY!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_run_imports_neither_celery_nor_psycopg(tmp_path: Path) -> None:
    """Where only an engine is installed: the service's broker and database drivers stay out
    (the bench engine: no vLLM either)."""
    src = make_input(tmp_path / "in.csv", 10)
    args = [str(src), "-o", str(tmp_path / "o.csv"), "--task", "generate", "--model", MODEL]
    assert imported_in_a_run(args, {**os.environ, "DOCQUEUE_ENGINE": "bench"}) == []


def batch_file(path: Path, n: int, **extra: object) -> Path:
    lines = []
    for i in range(1, n + 1):
        body: dict[str, object] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"say {i}"}],
            "max_tokens": 5,
        }
        if i == 3:
            body.update(extra)
        lines.append(
            json.dumps(
                {
                    "custom_id": f"req-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_openai_batch_file_gives_openai_output_and_error_lines(tmp_path: Path) -> None:
    from openai.types.batch_error import BatchError  # noqa: F401 (the SDK is installed)
    from openai.types.chat import ChatCompletion

    src = batch_file(tmp_path / "requests.jsonl", 12, logit_bias={"1": 2})
    out = tmp_path / "out.jsonl"
    code, text = run(str(src), "-o", str(out), "--model", MODEL)
    assert code == 0, text
    assert "11 output lines" in text and "1 error lines" in text
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [f"req-{i}" for i in range(1, 13) if i != 3]
    for x in lines:
        completion = ChatCompletion.model_validate(x["response"]["body"])
        assert completion.model == "gpt-4o-mini" and completion.choices[0].message.content
    (bad,) = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert bad["custom_id"] == "req-3" and bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["param"] == "logit_bias"

    code, text = run(str(src), "-o", str(out), "--task", "generate")
    assert code == 1 and "drop --task" in text
    code, text = run(str(src), "-o", str(tmp_path / "out.csv"))
    assert code == 1 and ".jsonl" in text


def test_a_faulty_batch_file_is_refused_naming_its_lines(tmp_path: Path) -> None:
    src = batch_file(tmp_path / "requests.jsonl", 4)
    src.write_text(src.read_text() + src.read_text().splitlines()[0] + "\n")  # req-1 again
    code, text = run(str(src), "-o", str(tmp_path / "out.jsonl"), "--model", MODEL)
    assert code == 1 and "line 5: custom_id 'req-1' is used by an earlier line" in text
    assert not (tmp_path / "out.jsonl").exists()


def test_transformers_engine_classifies_with_an_encoder_classifier_and_its_own_labels(
    tmp_path: Path,
) -> None:
    from tests.support.models import tiny_bert_model

    src = tmp_path / "in.csv"
    src.write_text(
        "id,text\n"
        + "".join(f"t{i},ticket {i}: the {w} is {v}\n" for i, (w, v) in enumerate(
            [("api", "down"), ("invoice", "wrong"), ("site", "slow"), ("card", "declined")] * 5
        ))
    )  # fmt: skip
    out = tmp_path / "out.csv"
    model = tiny_bert_model()
    code, text = run(str(src), "-o", str(out), "--engine", "transformers", "--task", "classify",
                     "--model", model, "--id-column", "id")  # fmt: skip
    assert code == 0, text
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == [f"t{i}" for i in range(20)]
    assert {r["label"] for r in rows} <= {"billing", "outage", "other"}
    assert all(0 < float(r["confidence"]) <= 1 and r["error"] == "" for r in rows)
    code, text = run(str(src), "-o", str(tmp_path / "g.csv"), "--engine", "transformers",
                     "--task", "generate", "--model", model)  # fmt: skip
    assert code == 1 and "is a classifier (labels ['billing', 'outage', 'other'])" in text
    code, text = run(str(src), "-o", str(tmp_path / "l.csv"), "--engine", "transformers",
                     "--task", "classify", "--labels", "a,b", "--model", model)  # fmt: skip
    assert code == 1 and "the classifier's own" in text
    code, text = run(str(src), "-o", str(tmp_path / "v.csv"), "--engine", "vllm",
                     "--task", "classify", "--model", model)  # fmt: skip
    assert code == 1 and "use --engine transformers" in text


def test_run_on_the_transformers_engine_imports_neither_vllm_celery_nor_psycopg(
    tmp_path: Path,
) -> None:
    """Where only torch and transformers are installed."""
    from tests.support.models import tiny_model

    src = make_input(tmp_path / "in.csv", 10)
    args = [str(src), "-o", str(tmp_path / "o.csv"), "--engine", "transformers",
            "--task", "summarize", "--max-tokens", "4", "--model", tiny_model()]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DOCQUEUE_ENGINE"}
    assert imported_in_a_run(args, env) == []
    rows = list(csv.DictReader((tmp_path / "o.csv").open()))
    assert len(rows) == 10 and all(r["output"] and r["completion_tokens"] == "4" for r in rows)
