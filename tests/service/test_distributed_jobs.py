"""A job with two training ranks through the service (`--max-job-ranks 2`), driven by the openai SDK in strict
mode: it reports what a one-process job reports (step metrics events, checkpoint rows, a result file), and a
cancel ends it `cancelled`, not `failed`."""
from __future__ import annotations

import csv
import io
import time

import pytest

from tests.service.conftest import Server, tiny_job, wait_for

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks_server(tmp_path_factory, service_model):
    # Attempts as fresh processes here (--no-fork-attempts): the other service tests fork them from the worker
    server = Server(tmp_path_factory.mktemp("ranks") / "data", service_model, None, workers=1,
                    extra=["--max-job-ranks", "2", "--no-fork-attempts"])
    server.start()
    yield server
    server.stop()


def _two_ranks(**training) -> dict:
    body = tiny_job(**training)
    body["tuneforge"]["distributed"] = {"strategy": "ddp", "nproc": 2, "timeout_seconds": 60}
    return body


def _upload(client, path) -> str:
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def test_a_two_rank_job_reports_metrics_checkpoints_and_results(ranks_server, train_jsonl):
    client = ranks_server.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=_upload(client, train_jsonl),
                                         extra_body=_two_ranks(max_steps=4, save_every=2))
    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"), timeout=240)
    assert done.status == "succeeded", done.error
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = sorted((e for e in events if e.type == "metrics"), key=lambda e: e.data["step"])
    assert [e.data["step"] for e in metrics] == [1, 2, 3, 4]
    assert all(e.message.startswith(f"Step {e.data['step']}/4: training loss=") for e in metrics)
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)] == [4, 2]
    rows = list(csv.DictReader(io.StringIO(client.files.content(done.result_files[0]).text)))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["train_loss"]) == pytest.approx(metrics[-1].data["train_loss"])
    answer = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=2, temperature=0,
                                            messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content is not None


def test_cancelling_a_two_rank_job_ends_it_cancelled(ranks_server, train_jsonl):
    client = ranks_server.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=_upload(client, train_jsonl),
                                         extra_body=_two_ranks(max_steps=5000, save_every=1000))
    deadline = time.time() + 180
    while not any(e.type == "metrics" and e.data["step"] >= 2 for e in client.fine_tuning.jobs.list_events(job.id)):
        assert time.time() < deadline, "the job never reached step 2"
        time.sleep(0.25)
    client.fine_tuning.jobs.cancel(job.id)
    done = wait_for(client, job.id, ("cancelled", "failed", "succeeded"), timeout=90)
    assert done.status == "cancelled", done.error
    assert done.error is None and done.fine_tuned_model is None
    steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
    assert steps and steps[0] >= 2  # stopped at a step boundary with a checkpoint, all ranks together
