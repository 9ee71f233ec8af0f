"""Download slots through the real app: refused at once when full, never leaked."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.api.downloads import slots_of
from tests.support.helpers import auth, submit


def test_a_download_past_the_limit_is_refused_with_retry_after(
    client: TestClient, api_key: str, model_name: str
) -> None:
    """With every slot taken (as by downloads in progress) one more is refused at once with a
    503 that says why and when to retry, instead of taking a database connection."""
    job_id = submit(client, api_key, "text\na\n", model=model_name).json()["id"]
    url = f"/v1/jobs/{job_id}/results"
    slots = slots_of(client.app)  # type: ignore[arg-type]
    limit = client.app.state.settings.api.max_concurrent_exports  # type: ignore[attr-defined]
    before = slots.in_use
    for _ in range(limit - before):
        slots.acquire(limit)
    try:
        resp = client.get(url, headers=auth(api_key))
        assert resp.status_code == 503
        assert int(resp.headers["retry-after"]) > 0
        error = resp.json()["error"]
        assert error["code"] == "exports_busy"
        assert "DOCQUEUE_MAX_CONCURRENT_EXPORTS" in error["message"]
    finally:
        for _ in range(limit - before):
            slots.release()
    assert client.get(url, headers=auth(api_key)).status_code == 200
    # Finished, refused and failed downloads all leave the count where it was.
    assert client.get(f"/v1/jobs/{job_id}x/results", headers=auth(api_key)).status_code == 404
    assert slots.in_use == before
