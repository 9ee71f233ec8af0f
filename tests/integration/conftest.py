from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    """The real app in-process (httpx transport) against the real Postgres and Redis."""
    with TestClient(create_app(settings)) as c:
        yield c
