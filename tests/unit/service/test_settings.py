"""Settings read from DOCQUEUE_* environment variables."""

from __future__ import annotations

import pytest

from service.settings import Settings


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCQUEUE_MAX_ROWS_PER_JOB", "42")
    monkeypatch.setenv("DOCQUEUE_REDIS_URL", "redis://r:1/2")
    s = Settings()
    assert s.max_rows_per_job == 42 and s.redis_url == "redis://r:1/2"
    assert Settings.model_fields["max_document_bytes"].default == 1024 * 1024
    assert Settings.model_fields["max_rows_per_job"].default == 2_000_000
    assert Settings.model_fields["database_url"].default == (
        "postgresql+psycopg://postgres@127.0.0.1:5432/docqueue"
    )
