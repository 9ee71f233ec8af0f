"""Settings: grouped in code, read from DOCQUEUE_* variables (environment or .env), and only
from those."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, WorkerSettings, env_names
from tests.support import ROOT


def test_variables_land_in_their_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCQUEUE_MAX_ROWS_PER_JOB", "42")
    monkeypatch.setenv("DOCQUEUE_REDIS_URL", "redis://r:1/2")
    monkeypatch.setenv("docqueue_worker_heartbeat_s", "2.5")  # case-insensitive, as before
    monkeypatch.setenv("DOCQUEUE_ENGINE", "bench")
    s = Settings()
    assert s.jobs.max_rows_per_job == 42 and s.broker.url == "redis://r:1/2"
    assert s.worker.heartbeat_s == 2.5 and s.engine.kind == "bench"
    assert s.jobs.max_document_bytes == 1024 * 1024  # untouched fields keep their defaults


def test_only_docqueue_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A platform's PORT or HOST (or a field name without the prefix) never leaks in."""
    for name, value in (("PORT", "9"), ("HOST", "evil"), ("LEASE_S", "999"), ("URL", "x://")):
        monkeypatch.setenv(name, value)
    s = Settings()
    assert s.api.port == 8000 and s.api.host == "127.0.0.1" and s.worker.lease_s == 60
    assert s.database.url.startswith("postgresql+psycopg://")


def test_a_bad_value_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCQUEUE_LEASE_S", "1")
    with pytest.raises(ValidationError, match="DOCQUEUE_LEASE_S"):
        Settings()
    monkeypatch.delenv("DOCQUEUE_LEASE_S")
    monkeypatch.setenv("DOCQUEUE_LOG_FORMAT", "xml")
    with pytest.raises(ValidationError, match="DOCQUEUE_LOG_FORMAT"):
        Settings()


def test_dotenv_file_is_read_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("DOCQUEUE_LEASE_S=30\nDOCQUEUE_MAX_ATTEMPTS=7\nPORT=1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DOCQUEUE_MAX_ATTEMPTS", "5")
    s = Settings()
    assert (s.worker.lease_s, s.worker.max_attempts, s.api.port) == (30, 5, 8000)


def test_code_passes_fields_by_name_and_assignments_are_checked() -> None:
    s = Settings(worker=WorkerSettings(lease_s=5))
    assert s.worker.lease_s == 5
    with pytest.raises(ValidationError):
        s.worker.lease_s = 1  # below the minimum
    with pytest.raises(ValidationError):
        Settings(lease_s=5)  # type: ignore[call-arg]  # flat names are gone


def test_the_readme_documents_every_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in env_names() if f"`{name}`" not in readme]
    assert missing == []
