"""The fine-tuning service through the official openai SDK in strict mode (every answer validated against
the SDK's own types), against a real `tuneforge serve` on SQLite and on PostgreSQL."""
from __future__ import annotations

import csv
import io
import json
import time

import httpx
import openai
import pytest

from tests.conftest import CHAT_RECORDS
from tests.service.conftest import tiny_job, wait_for


def upload(client, path) -> str:
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def test_lifecycle(server, train_jsonl):
    client = server.client()
    file_id = upload(client, train_jsonl)
    assert client.files.retrieve(file_id).filename == "train.jsonl"
    assert client.files.content(file_id).content == train_jsonl.read_bytes()

    job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, suffix="triage", seed=7,
                                         metadata={"team": "support"},
                                         method={"type": "supervised", "supervised": {"hyperparameters": {
                                             "batch_size": 4, "learning_rate_multiplier": 2}}},
                                         extra_body=tiny_job(max_steps=6))
    assert job.status == "queued" and job.seed == 7 and job.metadata == {"team": "support"}
    assert job.hyperparameters.batch_size == 4 and job.hyperparameters.learning_rate_multiplier == 2.0
    done = wait_for(client, job.id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny:acme:triage:{job.id.split('-')[1][:8]}"
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at and done.estimated_finish is None

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed"  # newest first
    assert messages[-1].startswith("Validating training file")
    assert "Fine-tuning job started" in messages
    metrics = [e for e in events if e.type == "metrics"]
    assert sorted(e.data["step"] for e in metrics) == [1, 2, 3, 4, 5, 6]
    assert all(e.message.startswith(f"Step {e.data['step']}/6: training loss=") for e in metrics)

    ckpts = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in ckpts] == [6, 4]  # the run keeps its newest two (keep_checkpoints)
    assert ckpts[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-6"
    assert ckpts[0].metrics.train_loss == pytest.approx(next(e.data["train_loss"] for e in metrics
                                                             if e.data["step"] == 6))

    rows = list(csv.DictReader(io.StringIO(client.files.content(done.result_files[0]).text)))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert client.files.retrieve(done.result_files[0]).purpose == "fine-tune-results"

    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    assert client.models.retrieve(done.fine_tuned_model).owned_by == "acme"
    assert client.models.delete(done.fine_tuned_model).deleted
    assert done.fine_tuned_model not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(done.fine_tuned_model)
    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)


def test_cancel_stops_a_running_job_with_a_checkpoint(server, train_jsonl):
    client = server.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=upload(client, train_jsonl),
                                         extra_body=tiny_job(max_steps=2000, save_every=1000))
    _wait_for_step(client, job.id, 2)
    asked = time.time()
    assert client.fine_tuning.jobs.cancel(job.id).id == job.id
    done = wait_for(client, job.id, ("cancelled",), timeout=30)
    assert time.time() - asked < 15, "cancel took too long"
    assert done.finished_at is not None and done.fine_tuned_model is None
    assert any(e.message.startswith("Job cancelled at step") for e in client.fine_tuning.jobs.list_events(job.id))
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


def _wait_for_step(client, job_id: str, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(e.type == "metrics" and e.data["step"] >= step
               for e in client.fine_tuning.jobs.list_events(job_id, limit=5)):
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach step {step}")


def test_pause_and_resume_continue_the_same_run(server, train_jsonl):
    # The SDK's FineTuningJob.status literal has no "paused" (the API has pause/resume): a lenient client.
    client = server.client(strict=False)
    job = client.fine_tuning.jobs.create(model="tiny", training_file=upload(client, train_jsonl),
                                         extra_body=tiny_job(max_steps=400, save_every=1000))
    _wait_for_step(client, job.id, 2)
    client.fine_tuning.jobs.pause(job.id)
    paused = wait_for(client, job.id, ("paused",), timeout=30)
    step = server.store().get_job(job.id)["step"]
    assert step >= 2 and paused.status == "paused"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait_for(client, job.id, ("succeeded", "failed"), timeout=300)
    assert done.status == "succeeded", done.error
    steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=1000) if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 401)), "each step recorded once, none lost across pause/resume"
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert f"Fine-tuning resumed from step {step}/400" in messages


def test_pagination(server, train_jsonl):
    client = server.client("pager")
    ids = [upload(client, train_jsonl) for _ in range(5)]
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == ids[::-1][:2] and page.has_more
    assert [f.id for f in client.files.list(limit=2)] == ids[::-1]  # the SDK follows `after` / has_more
    assert [f.id for f in client.files.list(order="asc", limit=3)] == ids
    jobs = [client.fine_tuning.jobs.create(model="tiny", training_file=ids[0], extra_body=tiny_job(max_steps=1)).id
            for _ in range(3)]
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == jobs[::-1]
    wait_for(client, jobs[0], ("succeeded",))  # its events are paged below; the other two need not train
    for job_id in jobs[1:]:
        client.fine_tuning.jobs.cancel(job_id)
    for job_id in jobs[1:]:
        wait_for(client, job_id, ("cancelled", "succeeded"))
    events = client.fine_tuning.jobs.list_events(jobs[0], limit=2)
    assert events.has_more and len(events.data) == 2
    everything = [e.id for e in client.fine_tuning.jobs.list_events(jobs[0], limit=2)]
    assert len(everything) == len(set(everything)) == len(list(client.fine_tuning.jobs.list_events(jobs[0], limit=100)))
    tagged = client.fine_tuning.jobs.create(model="tiny", training_file=ids[0], metadata={"k": "v"},
                                            extra_body=tiny_job(max_steps=1))
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"k": "v"})] == [tagged.id]


def test_two_orgs_are_isolated(server, train_jsonl):
    a, b = server.client("alpha"), server.client("beta")
    file_id = upload(a, train_jsonl)
    job = a.fine_tuning.jobs.create(model="tiny", training_file=file_id, extra_body=tiny_job(max_steps=2))
    done = wait_for(a, job.id, ("succeeded",))
    for call in (lambda: b.files.retrieve(file_id), lambda: b.files.content(file_id), lambda: b.files.delete(file_id),
                 lambda: b.fine_tuning.jobs.retrieve(job.id), lambda: b.fine_tuning.jobs.cancel(job.id),
                 lambda: list(b.fine_tuning.jobs.list_events(job.id)),
                 lambda: list(b.fine_tuning.jobs.checkpoints.list(job.id)),
                 lambda: b.models.retrieve(done.fine_tuned_model), lambda: b.models.delete(done.fine_tuned_model)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as e:  # another org's file cannot be trained on either
        b.fine_tuning.jobs.create(model="tiny", training_file=file_id)
    assert e.value.body["param"] == "training_file"
    assert file_id not in [f.id for f in b.files.list()]
    assert job.id not in [j.id for j in b.fine_tuning.jobs.list()]
    assert done.fine_tuned_model not in [m.id for m in b.models.list()]
    assert a.models.retrieve(done.fine_tuned_model).id == done.fine_tuned_model


def test_keys(server):
    url = server.url
    for headers in ({}, {"Authorization": "Bearer sk-tf-nope"}, {"Authorization": "Bearer " + "sk-tf-" + "x" * 40},
                    {"Authorization": "Basic abc"}):
        r = httpx.get(f"{url}/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
    key = server.key("acme")
    assert httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key[:-1]}x"}).status_code == 401
    store = server.store()
    from sqlalchemy import select

    from tuneforge.service.storage.schema import api_keys

    with store.read() as c:
        stored = [dict(r) for r in c.execute(select(api_keys)).mappings()]
    assert stored and all(key not in json.dumps(r) for r in stored)  # only a prefix and an HMAC
    assert all(len(r["digest"]) == 64 for r in stored)


def _error(call):
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value.status_code, e.value.body


def test_error_paths(server, train_jsonl, tmp_path):
    client = server.client("errors")
    file_id = upload(client, train_jsonl)
    create = client.fine_tuning.jobs.create
    cases = [
        (lambda: create(model="gpt-4o", training_file=file_id), 400, "model", "model_not_available"),
        (lambda: create(model="tiny", training_file="file-missing"), 400, "training_file", "file_not_found"),
        (lambda: create(model="tiny", training_file=file_id, validation_file="file-nope"), 400, "validation_file",
         "file_not_found"),
        (lambda: create(model="tiny", training_file=file_id, hyperparameters={"n_epochs": 0}), 400,
         "hyperparameters.n_epochs", None),
        (lambda: create(model="tiny", training_file=file_id, method={"type": "reinforcement"}), 400, "method.type",
         "unsupported_method"),
        (lambda: create(model="tiny", training_file=file_id, extra_body={"tuneforge": {"training": {"lrr": 1}}}), 400,
         "tuneforge.training.lrr", "invalid_job_spec"),
        (lambda: create(model="tiny", training_file=file_id, extra_body={"tuneforge": {"output_dir": "/etc"}}), 400,
         "tuneforge.output_dir", None),
        (lambda: create(model="tiny", training_file=file_id, extra_body={"status": "succeeded"}), 400, "status", None),
        (lambda: create(model="tiny", training_file=file_id, extra_body={"organization_id": "org-x"}), 400,
         "organization_id", None),
        (lambda: create(model="tiny", training_file=file_id, extra_body={"trained_tokens": 5}), 400, "trained_tokens",
         None),
        (lambda: create(model="tiny", training_file=file_id, suffix="a:b"), 400, "suffix", None),
        (lambda: client.files.create(file=("x.jsonl", b"not json\n"), purpose="fine-tune"), 400, "file",
         "invalid_file_format"),
        (lambda: client.files.create(file=("x.jsonl", b""), purpose="fine-tune"), 400, "file", "invalid_file"),
        (lambda: client.files.create(file=("x.jsonl", b"{}\n"), purpose="batch"), 400, "purpose", None),
        (lambda: client.files.retrieve("file-nope"), 404, "file_id", "not_found"),
        (lambda: client.fine_tuning.jobs.retrieve("ftjob-nope"), 404, "fine_tuning_job_id", "not_found"),
        (lambda: client.models.delete("tiny"), 400, "model", "cannot_delete_base_model"),
        (lambda: client.files.list(after="file-nope"), 400, "after", None),
    ]
    for call, status, param, code in cases:
        got_status, body = _error(call)
        assert (got_status, body["param"]) == (status, param), body
        assert body["message"] and body["type"]
        if code:
            assert body["code"] == code, body
    # A file in the wrong shape fails its job with OpenAI's code, naming the lines.
    bad = client.files.create(file=("bad.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n' * 12),
                              purpose="fine-tune")
    job = create(model="tiny", training_file=bad.id)
    assert job.status == "failed" and job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "line 1: messages: no assistant turn" in job.error.message
    few = client.files.create(file=("few.jsonl", "".join(json.dumps(r) + "\n" for r in CHAT_RECORDS[:3]).encode()),
                              purpose="fine-tune")
    job = create(model="tiny", training_file=few.id)
    assert job.status == "failed" and job.error.code == "invalid_n_examples"


def test_upload_limit_and_filenames(server, tmp_path):
    client = server.client("uploads")
    weird = client.files.create(file=("../../etc/passwd", b'{"a": 1}\n'), purpose="fine-tune")
    assert weird.filename == "../../etc/passwd"  # shown back as given, never used as a path
    stored = list((server.data_dir / "files").iterdir())
    assert all(p.name.startswith("file-") for p in stored) and not (server.data_dir.parent / "etc").exists()
    big = b'{"a": "' + b"x" * (1024 * 1024) + b'"}\n'
    r = httpx.post(f"{server.url}/files", headers={"Authorization": f"Bearer {server.key('uploads')}"},
                   files={"file": ("big.jsonl", big * 2)}, data={"purpose": "fine-tune"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"


def test_idempotency_keys(server, train_jsonl):
    client = server.client("idem")
    file_id = upload(client, train_jsonl)
    headers = {"Idempotency-Key": "create-1"}
    first = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, extra_body=tiny_job(max_steps=1),
                                           extra_headers=headers)
    again = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, extra_body=tiny_job(max_steps=1),
                                           extra_headers=headers)
    assert again.id == first.id and len(client.fine_tuning.jobs.list().data) == 1
    status, body = _error(lambda: client.fine_tuning.jobs.create(model="tiny", training_file=file_id, seed=3,
                                                                 extra_headers=headers))
    assert status == 422 and body["code"] == "idempotency_key_reused"
    with open(train_jsonl, "rb") as f:
        one = client.files.create(file=f, purpose="fine-tune", extra_headers={"Idempotency-Key": "up-1"})
    with open(train_jsonl, "rb") as f:
        two = client.files.create(file=f, purpose="fine-tune", extra_headers={"Idempotency-Key": "up-1"})
    assert one.id == two.id


def test_per_org_job_limit(server, train_jsonl):
    client = server.client("busy")
    file_id = upload(client, train_jsonl)
    jobs = [client.fine_tuning.jobs.create(model="tiny", training_file=file_id,
                                           extra_body=tiny_job(max_steps=2000, save_every=1000)) for _ in range(4)]
    status, body = _error(lambda: client.fine_tuning.jobs.create(model="tiny", training_file=file_id))
    assert status == 429 and body["code"] == "too_many_jobs"
    for job in jobs:
        client.fine_tuning.jobs.cancel(job.id)
    for job in jobs:
        wait_for(client, job.id, ("cancelled",), timeout=60)


def test_before_after_report(server, train_jsonl, tmp_path):
    """A job with a validation_file and tuneforge.eval.before_after gets report.json and report.md among its result
    files: the base and the fine-tuned model on the held-out file, with no path of the server in them."""
    client = server.client("report")
    file_id = upload(client, train_jsonl)
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in CHAT_RECORDS[:3]))
    valid_id = upload(client, held_out)
    ext = tiny_job(max_steps=2)
    ext["tuneforge"]["eval"] = {"before_after": True, "max_new_tokens": 8, "examples": 2}
    job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, validation_file=valid_id,
                                         extra_body=ext)
    done = wait_for(client, job.id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    names = {client.files.retrieve(f).filename: f for f in done.result_files}
    assert set(names) == {"step_metrics.csv", "report.json", "report.md"}
    text = client.files.content(names["report.json"]).text
    report = json.loads(text)
    assert report["data"] == valid_id
    for side in ("base", "fine_tuned"):
        assert report[side]["examples"] == 3
        assert report[side]["loss"] > 0 and 0 <= report[side]["token_accuracy"] <= 1
        assert len(report[side]["outputs"]) == 3
    markdown = client.files.content(names["report.md"]).text
    assert "| metric | base | fine-tuned | better |" in markdown and valid_id in markdown
    for content in (text, markdown):
        assert str(server.data_dir) not in content and "/tmp" not in content and "jobs/" not in content
    summary = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)
               if e.message.startswith("Before/after report on 3 held-out examples")]
    assert len(summary) == 1 and " -> " in summary[0], summary


def test_before_after_report_needs_the_validation_file(server, train_jsonl):
    client = server.client("report-errors")
    file_id = upload(client, train_jsonl)
    create = client.fine_tuning.jobs.create
    cases = [  # (tuneforge.eval, validation_file, param, phrase)
        ({"before_after": True, "data": "/etc/passwd"}, file_id, "tuneforge.eval.data", "validation_file"),
        ({"before_after": True}, None, "validation_file", "validation_file"),
        ({"max_new_tokens": 257}, file_id, "tuneforge.eval.max_new_tokens", "1 to 256"),
        ({"examples": 21}, file_id, "tuneforge.eval.examples", "0 to 20"),
        ({"before_after": True, "loss": 1}, file_id, "tuneforge.eval.loss", "before_after"),
    ]
    for section, valid, param, phrase in cases:
        extra = {"validation_file": valid} if valid else {}
        status, body = _error(lambda: create(model="tiny", training_file=file_id, **extra,
                                             extra_body={"tuneforge": {"eval": section}}))
        assert (status, body["param"]) == (400, param), body
        assert phrase in body["message"], body
