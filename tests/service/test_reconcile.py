"""A kill -9 between a checkpoint's rename into place and its row (and mid-prune, with a `.tmp-delete-*` folder
left) once left the job's checkpoint rows disagreeing with its run folder for good, when the run had already
reached its last step (fault trials, PostgreSQL: rows [196, 198], disk [198, 200]). The next attempt now
reconciles rows with the disk before and after it trains."""
from __future__ import annotations

import json
import secrets

from tests.service.test_claims import _job_row
from tuneforge.files import RUN_MARKER
from tuneforge.service.context import ServiceContext
from tuneforge.service.runner import JobEvents
from tuneforge.training.run_dir import RunDir


def checkpoint(run, step: int, complete: bool = True):
    folder = run / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "state.json").write_text(json.dumps({"step": step}))
    return folder


def test_rows_follow_the_disk_after_a_kill_mid_prune(store, tmp_path):
    org = store.create_org("org-" + secrets.token_hex(4), "acme")
    job = {**_job_row("ftjob-" + secrets.token_hex(6), org["id"]), "status": "running"}
    store.insert_job(job)
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_MARKER).write_text("")  # a run folder tuneforge made: only there does it delete
    for step in (198, 200):
        checkpoint(run, step)
    (run / "checkpoints" / ".tmp-delete-step-000196").mkdir()  # killed after the prune's rename
    checkpoint(run, 202, complete=False)  # a step folder without its state: not a checkpoint
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 198, "train_loss": 1.5}, {"step": 200, "train_loss": 1.25, "train_token_accuracy": 0.5},
        {"step": 200, "eval_loss": 1.75}]) + '{"step": 201, "train_lo')  # and a torn last line
    ctx = ServiceContext(settings=None, store=store)
    events = JobEvents(ctx, job, "ft:tiny:acme::x", spec=None)
    events._record_checkpoint(196, {"step": 196, "train_loss": 2.0})  # the rows the killed attempt wrote
    events._record_checkpoint(198, {"step": 198, "train_loss": 1.5})

    events.reconcile(RunDir(run))
    events.reconcile(RunDir(run))  # idempotent

    rows = {r["step"]: r for r in store.list_checkpoints(job["id"], limit=10, after=None)[0]}
    assert sorted(rows) == [198, 200]
    assert rows[200]["metrics"] == {"step": 200, "train_loss": 1.25, "train_mean_token_accuracy": 0.5,
                                    "valid_loss": 1.75, "valid_mean_token_accuracy": None}
    assert rows[200]["model_name"] == "ft:tiny:acme::x:ckpt-step-200"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000198", "step-000200"]
    texts = [e["message"] for e in store.list_events(job["id"], limit=50, after=None)[0]]
    assert texts.count("Checkpoint created at step 200") == 1
