"""The API's contract, checked deterministically and in-process (test_schemathesis.py fuzzes it against a real
server): the OpenAPI document declares what each operation answers, a 405 names every method of its path,
a NUL character in a client's value is answered the same on SQLite and PostgreSQL, job requests refuse
numbers JSON does not have, and accepted API keys are remembered only briefly."""
from __future__ import annotations

import secrets
import time

import pytest

FINE_TUNING_TAGS = {"files", "fine-tuning", "models"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from tuneforge.service.app import create_app
    from tuneforge.service.settings import ServiceSettings

    return create_app(ServiceSettings(data_dir=tmp_path_factory.mktemp("contract") / "data"))


def test_every_operation_declares_its_answers(app):
    doc = app.openapi()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas, "validation problems are answered 400 in the error envelope"
    assert doc["components"]["securitySchemes"]["APIKey"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["APIKey"]["description"]}
    operations = [(f"{method.upper()} {path}", op) for path, methods in doc["paths"].items()
                  for method, op in methods.items() if set(op.get("tags", ())) & FINE_TUNING_TAGS]
    assert len(operations) == 16
    for name, op in operations:
        assert op["security"] == [{"APIKey": []}], name
        responses = op["responses"]
        assert "401" in responses and "200" in responses, name
        for status, answer in responses.items():
            if status != "200":
                assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}, \
                    (name, status)
        for parameter in op.get("parameters", []):
            if parameter["in"] == "path":
                assert parameter["schema"]["type"] == "string" and parameter.get("description"), (name, parameter)
    by_name = dict(operations)
    assert set(by_name["POST /v1/fine_tuning/jobs"]["responses"]) == {"200", "400", "401", "409", "413", "422", "429"}
    assert set(by_name["POST /v1/files"]["responses"]) == {"200", "400", "401", "409", "413", "422"}
    assert set(by_name["GET /v1/files/{file_id}"]["responses"]) == {"200", "401", "404"}
    upload = by_name["POST /v1/files"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["required"] == ["file", "purpose"] and upload["properties"]["file"]["format"] == "binary"
    content = by_name["GET /v1/files/{file_id}/content"]["responses"]["200"]["content"]
    assert content == {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    envelope = schemas["ErrorObject"]
    assert set(envelope["required"]) == {"message", "type", "param", "code"}


def test_405_names_every_method_served_at_the_path(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        for method, path, allowed in (("OPTIONS", "/v1/files/file-x", "GET, DELETE"),
                                      ("PUT", "/v1/files", "GET, POST"),
                                      ("PATCH", "/v1/models/ft:a/b:c", "GET, DELETE"),
                                      ("GET", "/v1/fine_tuning/jobs/ftjob-x/cancel", "POST")):
            r = client.request(method, path)
            assert r.status_code == 405 and r.headers["allow"] == allowed, (method, path, r.headers.get("allow"))
            assert r.json()["error"]["message"] == f"Method {method} not allowed on {path}"


def test_nul_in_a_client_value_is_not_found_on_both_databases(store):
    # PostgreSQL text cannot hold NUL: these were 500s there (psycopg refuses the query) and 404/400 on SQLite.
    from tuneforge.service.storage.store import now

    org = store.create_org("org-" + secrets.token_hex(4), "nul")["id"]
    assert store.get_file(org, "file-a\x00") is None
    assert store.get_job("ftjob-\x00", org) is None
    assert store.get_model("ft:a\x00", org) is None and store.get_checkpoint_by_model("ft:a\x00", org) is None
    assert store.list_files(org, purpose="fine-tune\x00", limit=5, order="desc", after=None) == ([], False)
    assert store.list_jobs(org, limit=5, after="ftjob-\x00", meta={}) == (None, False)  # an unknown cursor: 400

    # Free text a client controls (a file name, a role quoted in a validation message) is stored with U+FFFD.
    store.insert_file({"id": "file-nul", "org_id": org, "filename": "a\x00b.jsonl", "purpose": "fine-tune",
                       "bytes": 1, "created_at": now(), "status": "processed", "status_details": None, "job_id": None})
    assert store.get_file(org, "file-nul")["filename"] == "a\ufffdb.jsonl"
    store.insert_job({"id": "ftjob-nul", "org_id": org, "status": "failed", "model": "tiny", "fine_tuned_model": None,
                      "training_file": "file-nul", "validation_file": None, "suffix": None, "seed": 0, "metadata": None,
                      "hyperparameters": {}, "method": {"type": "supervised"}, "spec": {}, "error": None,
                      "created_at": now(), "started_at": None, "finished_at": None, "trained_tokens": None,
                      "estimated_finish": None, "result_files": [], "requested": None, "worker_id": None,
                      "heartbeat_at": None, "attempts": 0, "step": 0, "total_steps": None})
    assert store.add_event({"id": "ftevent-nul", "job_id": "ftjob-nul", "created_at": now(), "level": "error",
                            "message": "line 1: unknown role 'us\x00er'", "type": "message", "data": None,
                            "dedup": "failed"})
    rows, _ = store.list_events("ftjob-nul", limit=5, after=None)
    assert rows[0]["message"] == "line 1: unknown role 'us\ufffder'"
    # The same event again is dropped, and says so (on PostgreSQL rowcount said -1 for both).
    assert not store.add_event({k: v for k, v in rows[0].items() if k != "seq"} | {"id": "ftevent-again"})


def test_job_requests_refuse_what_json_and_model_names_cannot_hold():
    from pydantic import ValidationError

    from tuneforge.service.jobs.protocol import JobCreate

    base = {"model": "tiny", "training_file": "file-x"}
    for bad in ({"tuneforge": {"training": {"lr": float("inf")}}}, {"tuneforge": {"x": [1.0, float("nan")]}},
                {"suffix": "a\x00b"}, {"suffix": "a:b"}, {"suffix": " "}):
        with pytest.raises(ValidationError):
            JobCreate.model_validate({**base, **bad})
    assert JobCreate.model_validate({**base, "tuneforge": {"training": {"lr": 1e-4}}, "suffix": "triage"})


def test_accepted_keys_are_remembered_briefly_and_refusals_never():
    from tuneforge.service.auth import KeyCache, Org

    cache = KeyCache(seconds=0.05)
    cache.put("digest-a", Org("org-1", "acme"))
    assert cache.get("digest-a") == Org("org-1", "acme") and cache.get("digest-b") is None
    time.sleep(0.06)
    assert cache.get("digest-a") is None


def test_a_known_key_needs_no_database_query(app, monkeypatch):
    from fastapi.testclient import TestClient

    from tuneforge.service.auth import create_key

    key = create_key(app.state.store, app.state.pepper, "cached")
    calls = []
    real = app.state.store.key_by_prefix
    monkeypatch.setattr(app.state.store, "key_by_prefix", lambda prefix: calls.append(prefix) or real(prefix))
    with TestClient(app) as client:
        for _ in range(3):
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        for _ in range(2):
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}x"}).status_code == 401
    assert len(calls) == 3, "one lookup for the good key, one per refused request"
