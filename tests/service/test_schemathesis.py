"""Schemathesis over the OpenAPI document the server serves (`/openapi.json`), against a real `tuneforge serve`:
every operation is called with generated requests, valid and invalid, with a valid API key, and every
answer must be no 5xx, a declared status code and content type, and a body that matches its declared
schema (the error envelope included). Requests that break the schema must be refused with a 4xx, requests
without the key with a 401, and a method a path does not serve with a 405 naming the ones it does.

It runs Schemathesis's engine (what `schemathesis run` runs: examples, coverage and fuzzing phases) inside
one test; its pytest plugin's lazy loader does not work with pytest 9.2 (`Function._nodeid` is gone).

SQLite by default; TUNEFORGE_SCHEMATHESIS_DB=postgresql runs it on PostgreSQL (a new database, as
conftest makes them; skipped when none is reachable). TUNEFORGE_SCHEMATHESIS_TAGS picks the operations by
OpenAPI tag: by default `all` (the fine-tuning API: files, fine-tuning, models; and inference: chat and
completions on the tiny base model); e.g. `files,models` tests fewer; the summary names every served operation left out. TUNEFORGE_SCHEMATHESIS_EXAMPLES sets the examples
per operation and phase (default 50: ~2,600 requests, 45-65 s on 2 cores; 100 or more
for a deeper search), TUNEFORGE_SCHEMATHESIS_SEED
the seed (default fixed, so a failure reproduces).

Generated data alone would almost never name an object that exists, so hooks mix real ones in: the seeded
file and job ids in path parameters, the server's base model and uploaded file in job requests, and a
valid JSONL file in uploads. No worker runs (`--workers 0`): created jobs stay queued, which is what lets
cancel/pause/resume of a live job and, after 8 of them, the per-org job limit (429) be reached.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import strategies as st  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.engine import Status, events, from_schema  # noqa: E402

from tests.conftest import CHAT_RECORDS  # noqa: E402
from tests.service.conftest import Server, create_pg_database, drop_pg_database  # noqa: E402

DB = os.environ.get("TUNEFORGE_SCHEMATHESIS_DB", "sqlite")
MAX_EXAMPLES = int(os.environ.get("TUNEFORGE_SCHEMATHESIS_EXAMPLES", "50"))
SEED = int(os.environ.get("TUNEFORGE_SCHEMATHESIS_SEED", "20261128"))
TAGS = os.environ.get("TUNEFORGE_SCHEMATHESIS_TAGS", "all")
BASE = "smollm2-135m-instruct"  # the default base model's name: the one the schema's examples use
VALID_JSONL = "".join(json.dumps(r) + "\n" for r in CHAT_RECORDS * 2).encode()
# Mixed into generated strings: what a database or a JSON encoder may choke on (PostgreSQL text cannot hold
# NUL), path tricks, and names of our own objects in odd shapes.
HOSTILE_STRINGS = ["a\x00b", "\x00", "file-\x00", "ftjob-\x00", "ft:a/b:c", "../../etc/passwd", "%00", "x" * 5000,
                   "\u202e\ufeff", "é", "Robert'); DROP TABLE jobs;--", "1e400", "NaN", "-1", ""]
CHECKS = {
    "not_a_server_error": True,
    "status_code_conformance": True,
    "content_type_conformance": True,
    "response_schema_conformance": True,
    "response_headers_conformance": True,
    "negative_data_rejection": True,   # a request the schema forbids gets a 4xx
    "ignored_auth": True,              # the same request without the key gets a 401
    "unsupported_method": True,        # PUT/PATCH/... on a path gets a 405 ...
    "allow_header_conformance": True,  # ... whose Allow header names the methods served there
    "missing_required_header": True,
    # A schema-valid request may still be refused for a rule no schema can state (an unknown `after`
    # cursor, deleting a base model, a file that is not JSONL): 400 is the documented answer there.
    "positive_data_acceptance": False,
    # Stateful checks (they need the stateful phase and links between operations).
    "use_after_free": False,
    "ensure_resource_availability": False,
    "object_level_authorization": False,
}


@pytest.fixture(scope="module")
def st_server(tmp_path_factory, service_model):
    database_url = name = None
    if DB == "postgresql":
        made = create_pg_database()
        if made is None:
            pytest.skip("PostgreSQL not available here")
        database_url, name = made
    elif DB != "sqlite":
        raise ValueError(f"TUNEFORGE_SCHEMATHESIS_DB={DB!r}: use sqlite or postgresql")
    server = Server(tmp_path_factory.mktemp(f"schemathesis-{DB}") / "data", service_model, database_url,
                    workers=0, extra=["--max-upload-mb", "1", "--max-jobs-per-org", "8",
                             "--base-model", f"{BASE}={service_model}"])
    server.start()
    yield server
    server.stop()
    if name:
        drop_pg_database(name)


def load_schema(server: Server):
    """The served OpenAPI document with the key, the checks and the hooks that put real ids into requests."""
    client = server.client("fuzz", strict=False)
    file_id = client.files.create(file=("train.jsonl", VALID_JSONL), purpose="fine-tune").id
    job_ids = [client.fine_tuning.jobs.create(model=BASE, training_file=file_id).id for _ in range(2)]
    real = {"file_id": file_id, "job_id": job_ids[0], "model_id": BASE}

    config = SchemathesisConfig.from_dict({
        "seed": SEED,
        "headers": {"Authorization": f"Bearer {server.key('fuzz')}"},
        "generation": {"max-examples": MAX_EXAMPLES, "mode": "all",
                       "dictionaries": {"string": {"dictionary": "hostile", "probability": 0.15}}},
        "dictionaries": {"hostile": {"values": HOSTILE_STRINGS}},
        "phases": {"stateful": {"enabled": False}},
        "checks": {name: {"enabled": enabled} for name, enabled in CHECKS.items()},
        "request-timeout": 30,
    })
    schema = schemathesis.openapi.from_url(server.url.removesuffix("/v1") + "/openapi.json", config=config)
    if TAGS != "all":
        schema = schema.include(tag=TAGS.split(","))

    def with_real_objects(case):
        operation = f"{case.method.upper()} {case.path}"
        if isinstance(case.path_parameters, dict):
            case.path_parameters.update({k: v for k, v in real.items() if k in case.path_parameters})
            if operation.endswith(("/pause", "/resume")):  # a job of their own, so cancel does not end it first
                case.path_parameters["job_id"] = job_ids[1]
        if isinstance(case.body, dict) and operation == "POST /v1/fine_tuning/jobs":
            case.body.update(model=BASE, training_file=file_id)
        elif isinstance(case.body, dict) and operation in ("POST /v1/chat/completions", "POST /v1/completions"):
            case.body["model"] = BASE
            if operation == "POST /v1/chat/completions":  # generated message lists are almost never valid chats
                case.body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
        elif isinstance(case.body, dict) and operation == "POST /v1/files":
            case.body.update(file=VALID_JSONL, purpose="fine-tune")
        return case

    @schema.hook
    def flatmap_case(ctx, case):
        # Half the valid cases name real objects; invalid ones stay as generated (they must be refused).
        if case.meta is not None and case.meta.generation.mode.is_negative:
            return st.just(case)
        return st.booleans().map(lambda real_ones: with_real_objects(case) if real_ones else case)

    return schema


def test_openapi_contract(st_server, request, capsys):
    schema = load_schema(st_server)
    statuses: dict[str, Counter] = defaultdict(Counter)
    failures: dict[str, set[str]] = defaultdict(set)
    errors: list[str] = []
    started = time.time()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for interaction in event.recorder.interactions.values():
                if interaction.response is not None:
                    statuses[event.label][interaction.response.status_code] += 1
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        failures[event.label].add(f"{check.name}: {failure.title}: {failure.message[:300]}\n"
                                                  f"    {check.failure_info.code_sample[:600]}")
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.info.format()[:600]}")
        elif isinstance(event, events.FatalError):
            raise event.exception
    seconds = time.time() - started

    served = {f"{method.upper()} {path}": operation.get("tags", [])
              for path, methods in schema.raw_schema["paths"].items() for method, operation in methods.items()}
    left_out = sorted(op for op, tags in served.items()
                      if TAGS != "all" and not set(tags) & set(TAGS.split(",")))
    total = sum(sum(c.values()) for c in statuses.values())
    lines = [f"schemathesis on {DB}: {len(statuses)} operations, {total} requests in {seconds:.0f} s "
             f"(max_examples={MAX_EXAMPLES}, seed={SEED}); {sum(map(len, failures.values()))} failures"]
    for operation, counts in sorted(statuses.items()):
        lines.append(f"  {operation:46s} {sum(counts.values()):5d}  "
                     + " ".join(f"{code}:{n}" for code, n in sorted(counts.items())))
    if left_out:
        lines.append(f"  not tested (TUNEFORGE_SCHEMATHESIS_TAGS={TAGS}): {', '.join(left_out)}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    request.node.user_properties.append(("schemathesis", {"operations": len(statuses), "requests": total}))

    server_errors = sum(n for counts in statuses.values() for code, n in counts.items() if code >= 500)
    assert not errors, "\n".join(errors)
    assert not failures, "\n".join(f"{op}:\n  " + "\n  ".join(sorted(f)) for op, f in sorted(failures.items()))
    assert server_errors == 0
    assert set(statuses) == set(served) - set(left_out), "every selected operation was called"
    assert all(any(200 <= code < 300 for code in statuses[op]) for op in (
        "POST /v1/files", "POST /v1/fine_tuning/jobs", "GET /v1/fine_tuning/jobs/{job_id}",
        "GET /v1/files/{file_id}/content")), "the hooks reach real objects"
