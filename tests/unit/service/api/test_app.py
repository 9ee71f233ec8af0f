"""The app's OpenAPI document describes every body a client gets (response models on every
route), without a database: building the schema touches none."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings

#: Routes whose 2xx body is not JSON: streamed files and Prometheus text.
NOT_JSON = {("get", "/v1/jobs/{job_id}/results"), ("get", "/v1/files/{file_id}/content")}


def openapi() -> dict[str, Any]:
    with TestClient(create_app(Settings())) as client:
        doc: dict[str, Any] = client.get("/openapi.json").json()
    return doc


def test_every_json_route_declares_its_response_schema() -> None:
    doc = openapi()
    missing = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if (method, path) in NOT_JSON:
                continue
            ok = [c for c in op["responses"] if c.startswith("2")]
            assert ok, (method, path)
            for code in ok:
                schema = op["responses"][code].get("content", {}).get("application/json", {})
                if not schema.get("schema"):
                    missing.append((method, path, code))
    assert missing == []


def test_job_schema_names_its_fields_and_errors_are_described() -> None:
    doc = openapi()
    job = doc["components"]["schemas"]["JobOut"]["properties"]
    for field in ("id", "status", "counts", "percent", "eta_s", "results_expired_at"):
        assert field in job
    assert set(doc["components"]["schemas"]["JobStatus"]["enum"]) >= {"queued", "completed"}
    submit = doc["paths"]["/v1/jobs"]["post"]
    assert "202" in submit["responses"] and "422" in submit["responses"]
    err = submit["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    assert err.endswith("/ErrorBody")
