"""`docqueue flower` and `docqueue worker` (service/cli/servers.py): what they refuse before
starting anything."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from service.cli import app as cli_app
from service.settings import get_settings


@pytest.fixture()
def fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from service.cli import output

    for console in (output.out, output.err):  # no wrapping at 80 columns inside messages
        monkeypatch.setattr(console, "width", 10_000)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_cli_flower_without_auth_exits_non_zero(fresh_settings: None) -> None:
    result = CliRunner().invoke(
        cli_app,
        ["flower"],
        env={"DOCQUEUE_FLOWER_BASIC_AUTH": ""},
    )
    assert result.exit_code == 2
    assert "DOCQUEUE_FLOWER_BASIC_AUTH" in result.output


def test_a_vllm_worker_refuses_a_sequence_classifier_naming_the_engine_that_serves_it(
    fresh_settings: None,
) -> None:
    from tests.support.models import tiny_bert_model

    model = tiny_bert_model()
    result = CliRunner().invoke(
        cli_app, ["worker", "--model", model, "--dry-run"], env={"DOCQUEUE_ENGINE": "vllm"}
    )
    assert result.exit_code == 1, result.output
    assert "sequence classifier (BertForSequenceClassification)" in result.output
    assert "--engine transformers" in result.output
    served = CliRunner().invoke(
        cli_app, ["worker", "--model", model, "--dry-run", "--engine", "transformers"]
    )
    assert served.exit_code == 0, served.output
    bad = CliRunner().invoke(cli_app, ["worker", "--dry-run", "--engine", "tensorrt"])
    assert bad.exit_code == 1 and "--engine 'tensorrt': expected vllm or transformers" in bad.output
