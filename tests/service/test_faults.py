"""kill -9 at the worst moments, on a real `tuneforge serve` (one worker, reclaim after 3 s, heartbeat 0.5 s):
the training subprocess mid-training and mid-checkpoint, the worker, the whole server (then started again
on the same data and database). Each job must still succeed with every step's metrics event exactly once,
one terminal transition, one model, one result file, its adapter on disk and no temporaries left.

The helpers (`group_processes`, `job_processes`, `audit_job`) are shared with bench/fault_trials.py.
"""
from __future__ import annotations

import csv
import io
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.service.conftest import _server, wait_for

RUNNER = "tuneforge.service.runner"
WORKER = "tuneforge.service.worker"


# ---------------------------------------------------------------- processes (via /proc: no psutil)


def group_processes(pgid: int) -> dict[int, list[str]]:
    """{pid: argv} of the live processes in a process group (`tuneforge serve` runs in its own session)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            # a forked training attempt's title is one string (setproctitle): "python -m ...runner JOB WORKER"
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").split()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            out[int(entry)] = [a.decode(errors="replace") for a in argv if a]
    return out


def job_processes(pgid: int, kind: str, job_id: str | None = None) -> list[int]:
    """pids of `python -m tuneforge.service.runner JOB_ID` (kind RUNNER) or of workers (kind WORKER)."""
    return [pid for pid, argv in group_processes(pgid).items()
            if kind in argv and (job_id is None or runner_job(argv) == job_id)]


def runner_job(argv: list[str]) -> str | None:
    """The job id of a `python -m tuneforge.service.runner JOB_ID WORKER_ID` command line."""
    at = argv.index(RUNNER) + 1 if RUNNER in argv else len(argv)
    return argv[at] if at < len(argv) else None


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


# ---------------------------------------------------------------- waiting


def last_step(store, job_id: str) -> int:
    """How many steps have a metrics event (each step has one, so: the newest step reported)."""
    return store.count_events(job_id, "step:")


def wait_until(condition, timeout: float, what: str, every: float = 0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---------------------------------------------------------------- the audit


def audit_job(store, data_dir: Path, job_id: str, total_steps: int) -> dict[str, list]:
    """Everything that must hold for a job that survived faults, as {problem kind: [details]} (empty: all good).
    Kinds: not_succeeded, lost_steps, duplicated_steps, terminal_events, model_events, models, result_files,
    results_csv, no_adapter, temporaries, partial_checkpoints, checkpoint_rows."""
    from sqlalchemy import select

    from tuneforge.service.storage.schema import files, models

    problems: dict[str, list] = {}

    def bad(kind: str, detail) -> None:
        problems.setdefault(kind, []).append(detail)

    job = store.get_job(job_id)
    if job is None or job["status"] != "succeeded":
        bad("not_succeeded", {"status": job and job["status"], "error": job and job["error"]})
    events, _ = store.list_events(job_id, limit=100_000, after=None)
    steps = Counter(e["data"]["step"] for e in events if e["type"] == "metrics")
    lost = sorted(set(range(1, total_steps + 1)) - set(steps))
    if lost:
        bad("lost_steps", lost)
    dup = sorted(s for s, n in steps.items() if n > 1)
    if dup:
        bad("duplicated_steps", dup)
    messages = Counter(e["message"] for e in events)
    terminal = {m: n for m, n in messages.items() if m == "The job has successfully completed"
                or m.startswith("Job cancelled") or any(e["level"] == "error" and e["message"] == m for e in events)}
    if terminal != {"The job has successfully completed": 1}:
        bad("terminal_events", terminal)
    created = sum(n for m, n in messages.items() if m.startswith("New fine-tuned model created"))
    if created != 1:
        bad("model_events", created)
    with store.read() as c:
        model_rows = c.execute(select(models.c.id).where(models.c.job_id == job_id)).scalars().all()
        file_rows = c.execute(select(files.c.id).where(files.c.job_id == job_id)).scalars().all()
    if len(model_rows) != 1 or (job and model_rows and model_rows[0] != job["fine_tuned_model"]):
        bad("models", model_rows)
    if len(file_rows) != 1 or (job and file_rows != job["result_files"]):
        bad("result_files", {"rows": file_rows, "job": job and job["result_files"]})
    elif (data_dir / "files" / f"{file_rows[0]}.jsonl").is_file():
        text = (data_dir / "files" / f"{file_rows[0]}.jsonl").read_text()
        csv_steps = [int(r["step"]) for r in csv.DictReader(io.StringIO(text))]
        if csv_steps != list(range(1, total_steps + 1)):
            bad("results_csv", Counter(csv_steps).most_common(3))
        event_loss = {e["data"]["step"]: e["data"]["train_loss"] for e in events if e["type"] == "metrics"}
        for r in csv.DictReader(io.StringIO(text)):  # a resumed step recomputes the same loss (exact resume)
            step, loss = int(r["step"]), float(r["train_loss"])
            if step in event_loss and abs(loss - event_loss[step]) > 1e-4:
                bad("results_csv", {"step": step, "csv": loss, "event": event_loss[step]})
    else:
        bad("result_files", "results file missing on disk")
    run = data_dir / "jobs" / job_id / "run"
    if not (run / "adapter" / "adapter_model.safetensors").is_file():
        bad("no_adapter", str(run / "adapter"))
    leftovers = [str(p.relative_to(run)) for p in (*run.glob(".tmp-*"), *run.glob("checkpoints/.tmp-*"))]
    if leftovers:
        bad("temporaries", leftovers)
    partial = [p.name for p in run.glob("checkpoints/step-*") if not (p / "state.json").is_file()]
    if partial:  # what a kill in the middle of deleting an old checkpoint leaves: never listed, never pruned
        bad("partial_checkpoints", partial)
    on_disk = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoints/step-*") if p.name not in partial)
    rows, _ = store.list_checkpoints(job_id, limit=1000, after=None)
    if sorted(r["step"] for r in rows) != on_disk:
        bad("checkpoint_rows", {"rows": sorted(r["step"] for r in rows), "disk": on_disk})
    return problems


# ---------------------------------------------------------------- the cases


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fault_server(request, tmp_path_factory, service_model):
    yield from _server(request, tmp_path_factory, service_model)


def start_job(server, train_jsonl, **training) -> str:
    from tests.service.conftest import tiny_job

    client = server.client("faults")
    with open(train_jsonl, "rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    return client.fine_tuning.jobs.create(model="tiny", training_file=file_id, extra_body=tiny_job(**training)).id


def finish_and_audit(server, job_id: str, total_steps: int) -> list[str]:
    wait_for(server.client("faults"), job_id, ("succeeded", "failed", "cancelled"), timeout=180)
    store = server.store()
    try:
        problems = audit_job(store, server.data_dir, job_id, total_steps)
        assert problems == {}
        assert not job_processes(server.proc.pid, RUNNER, job_id), "a training process outlived its job"
        events, _ = store.list_events(job_id, limit=10_000, after=None)
        return [e["message"] for e in events]
    finally:
        store.dispose()


def _skip_unless(server, *databases: str) -> None:
    db = "postgresql" if server.database_url else "sqlite"
    if db not in databases:
        pytest.skip(f"run on {', '.join(databases)} only (keeps the file under ~90 s)")


def test_kill_training_process_mid_training(fault_server, train_jsonl):
    _skip_unless(fault_server, "sqlite")
    job_id = start_job(fault_server, train_jsonl, max_steps=200, save_every=10)
    store = fault_server.store()
    wait_until(lambda: last_step(store, job_id) >= 25, 120, "step 25")
    (pid,) = job_processes(fault_server.proc.pid, RUNNER, job_id)
    (worker,) = job_processes(fault_server.proc.pid, WORKER)
    assert parent_of(pid) == worker
    assert kill(pid)
    store.dispose()
    messages = finish_and_audit(fault_server, job_id, 200)
    assert any(m.startswith("Training process ended unexpectedly (exit status -9)") for m in messages)
    assert any(m.startswith("Fine-tuning resumed from step") for m in messages)
    log = (fault_server.data_dir.parent / f"serve-{fault_server.port}.log").read_text()
    preloads = [line for line in log.splitlines() if "imported the training stack" in line and f"-{worker}-" in line]
    assert len(preloads) == 1, preloads  # both attempts forked from one import


def test_kill_worker_mid_training(fault_server, train_jsonl):
    # The only worker dies: the server starts another, which reclaims the job once its heartbeat is stale.
    _skip_unless(fault_server, "sqlite")
    job_id = start_job(fault_server, train_jsonl, max_steps=200, save_every=10)
    store = fault_server.store()
    wait_until(lambda: last_step(store, job_id) >= 25, 120, "step 25")
    (worker,) = job_processes(fault_server.proc.pid, WORKER)
    (runner,) = job_processes(fault_server.proc.pid, RUNNER, job_id)
    assert kill(worker)
    wait_until(lambda: runner not in group_processes(fault_server.proc.pid), 5, "the training to die with its worker")
    store.dispose()
    messages = finish_and_audit(fault_server, job_id, 200)
    assert any(m.startswith("Worker stopped responding; job requeued") for m in messages)
    assert len(job_processes(fault_server.proc.pid, WORKER)) == 1


def test_kill_whole_server_then_restart(fault_server, train_jsonl):
    job_id = start_job(fault_server, train_jsonl, max_steps=200, save_every=10)
    store = fault_server.store()
    wait_until(lambda: last_step(store, job_id) >= 25, 120, "step 25")
    pgid = fault_server.proc.pid
    fault_server.stop(signal.SIGKILL)
    wait_until(lambda: not group_processes(pgid), 10, "every process of the killed server to exit")
    assert store.get_job(job_id)["status"] == "running"  # as the dead worker left it
    store.dispose()
    fault_server.start()
    messages = finish_and_audit(fault_server, job_id, 200)
    assert any(m.startswith("Worker stopped responding; job requeued") for m in messages)


def kill_mid_checkpoint(pgid: int, job_id: str, checkpoints: Path, timeout: float = 60) -> Path | None:
    """SIGKILL the job's training process while it writes a checkpoint: right after a `.tmp-step-*` folder
    appears. The folder that was being written if the kill landed before its rename, else None (too late)."""
    deadline = time.time() + timeout
    pids = []
    while not pids and time.time() < deadline:
        pids = job_processes(pgid, RUNNER, job_id)
        time.sleep(0.01)
    assert pids, "no training process to kill"
    while time.time() < deadline:  # spin: a tiny model's checkpoint takes milliseconds
        try:
            tmp = next((Path(p.path) for p in os.scandir(checkpoints) if p.name.startswith(".tmp-step-")), None)
        except FileNotFoundError:
            tmp = None
        if tmp is not None:
            kill(pids[0])
            wait_until(lambda: pids[0] not in group_processes(pgid), 5, "the training process to die")
            return tmp if tmp.exists() else None
    raise AssertionError("never saw a checkpoint being written")


def test_kill_training_process_mid_checkpoint(fault_server, train_jsonl):
    _skip_unless(fault_server, "sqlite")
    job_id = start_job(fault_server, train_jsonl, max_steps=150, save_every=1)
    checkpoints = fault_server.data_dir / "jobs" / job_id / "run" / "checkpoints"
    store = fault_server.store()
    wait_until(lambda: last_step(store, job_id) >= 10, 120, "step 10")
    store.dispose()
    for _ in range(5):  # a kill may land just after the rename; then try again on the next attempt
        if kill_mid_checkpoint(fault_server.proc.pid, job_id, checkpoints) is not None:
            break
    else:
        raise AssertionError("five kills all missed the checkpoint write")
    messages = finish_and_audit(fault_server, job_id, 150)
    assert any(m.startswith("Training process ended unexpectedly (exit status -9)") for m in messages)


# A kill while the engine prunes an old checkpoint (after a new one is renamed into place): shutil.rmtree
# deletes the folder's files one by one, so the kill can leave `step-N/` without its state.json. Such a folder
# is never listed again (list_checkpoints needs state.json), so it is never pruned: its optimizer state stays
# on disk for good (a full fine-tune's is twice the model). Found by bench/fault_trials.py (SQLite, seed 0).
# The engine's `training/checkpoint.py` owns the fix (e.g. rename to `.tmp-…` before deleting, and sweep
# incomplete `step-*` / stale `.tmp-step-*` folders at each save); this service-side test shows it.
PRUNE_SCRIPT = """
import os, shutil, sys, time
from pathlib import Path
import torch
from tuneforge import files
from tuneforge.training.checkpoint import save_checkpoint

run, slow, steps = Path(sys.argv[1]), sys.argv[2] == "slow", [int(s) for s in sys.argv[3].split(",")]
files.mark(run, files.RUN_MARKER)
if slow:  # rmtree's order is the directory's (arbitrary): say state.json comes first; then wait to be killed
    def rmtree(path, *args, **kwargs):
        for name in sorted(os.listdir(path), key=lambda n: n != "state.json"):
            os.unlink(os.path.join(path, name))
            Path(str(run) + ".deleting").touch()
            time.sleep(10)
        os.rmdir(path)
    shutil.rmtree = rmtree
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
optimizer = torch.optim.AdamW(model.parameters())
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
for step in steps:
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    save_checkpoint(run, step, model, optimizer, scheduler, {"epoch": 0, "step_in_epoch": step, "tokens_seen": 0,
                                                             "schedule_steps": 10}, keep=2)
"""


def test_kill_while_pruning_an_old_checkpoint_leaves_nothing_behind(tmp_path):
    import subprocess
    import sys

    from tests.service.conftest import ENV

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", PRUNE_SCRIPT, str(run), "slow", "1,2,3"], env=ENV)
    try:  # step 3 is saved, and the prune of step 1 has deleted one file
        wait_until(lambda: (tmp_path / "run.deleting").exists(), 60, "the prune of step 1 to begin", every=0.01)
        assert (run / "checkpoints" / "step-000003" / "state.json").is_file()
    finally:
        proc.kill()
        proc.wait()
    subprocess.run([sys.executable, "-c", PRUNE_SCRIPT, str(run), "fast", "4,5"], env=ENV, check=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000005"]


# ---------------------------------------------------------------- SIGTERM: what every deploy sends


def _newest_checkpoint(server, job_id: str) -> int:
    steps = [int(p.name.split("-")[1]) for p in (server.data_dir / "jobs" / job_id / "run").glob("checkpoints/step-*")]
    return max(steps, default=0)


def _stop_and_time(server, sig_to_group: bool, signals: int = 1, between: float = 1.0) -> tuple[int, float]:
    """SIGTERM the server (its API process only, as `docker stop` and Kubernetes do, or its whole process group,
    as systemd does), `signals` times; (exit status, seconds until every process of it had exited)."""
    pgid, started = server.proc.pid, time.time()
    for i in range(signals):
        if i:
            time.sleep(between)
        os.killpg(pgid, signal.SIGTERM) if sig_to_group else os.kill(pgid, signal.SIGTERM)
    code = server.proc.wait(timeout=120)
    wait_until(lambda: not group_processes(pgid), 30, "every process of the stopped server to exit")
    return code, time.time() - started


@pytest.mark.parametrize("to_group", [False, True], ids=["api-process", "process-group"])
def test_sigterm_checkpoints_running_training_and_restart_resumes_it(fault_server, train_jsonl, to_group):
    if to_group:
        _skip_unless(fault_server, "sqlite")
    job_id = start_job(fault_server, train_jsonl, max_steps=60, save_every=1000)  # no periodic checkpoint
    store = fault_server.store()
    try:
        wait_until(lambda: last_step(store, job_id) >= 25, 120, "step 25")
        at_signal = last_step(store, job_id)
        code, seconds = _stop_and_time(fault_server, to_group)
        assert code == 0, "a graceful stop exits 0"
        assert seconds < 25, f"the stop took {seconds:.1f} s, past the grace period"
        job = store.get_job(job_id)
        assert job["status"] == "queued" and job["worker_id"] is None, job["status"]
        assert job["step"] >= at_signal, "progress lost beyond the step in flight"
        assert _newest_checkpoint(fault_server, job_id) == job["step"]
    finally:
        store.dispose()
    fault_server.start()
    messages = finish_and_audit(fault_server, job_id, 60)
    assert f"Worker shutting down; job requeued at step {job['step']}" in messages, [m for m in messages if "queue" in m or "resum" in m or "stop" in m.lower()]
    assert any(m.startswith(f"Fine-tuning resumed from step {job['step']}/60") for m in messages)


def _frozen_training(server, train_jsonl):
    """A job whose training is frozen (SIGSTOP) after its checkpoint at step 20: it can reach no step boundary.
    (job id, an open store, the step of the newest checkpoint the job records)."""
    job_id = start_job(server, train_jsonl, max_steps=60, save_every=10)
    store = server.store()
    wait_until(lambda: store.get_job(job_id)["step"] >= 20, 120, "the checkpoint at step 20")
    (runner,) = job_processes(server.proc.pid, RUNNER, job_id)
    _stop_outside_a_write(runner, server.data_dir / "tuneforge.db")
    return job_id, store, store.get_job(job_id)["step"]  # what the job records (the disk may be a step ahead)


def _stop_outside_a_write(pid: int, database: Path) -> None:
    """SIGSTOP `pid` at a moment it holds no write lock on the SQLite database. A training that cannot reach its
    step boundary is what these tests are about; a process frozen inside a write transaction would also block the
    worker's own writes for SQLite's busy timeout (30 s), which is another fault (kill -9 covers it)."""
    import sqlite3

    deadline = time.monotonic() + 30
    while True:
        os.kill(pid, signal.SIGSTOP)
        db = sqlite3.connect(database, timeout=0)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.rollback()
            return
        except sqlite3.OperationalError as e:
            assert "locked" in str(e) and time.monotonic() < deadline, e
        finally:
            db.close()
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)


def test_second_sigterm_stops_at_once_and_requeues_at_the_newest_checkpoint(fault_server, train_jsonl):
    """A training that cannot reach its step boundary (here: frozen with SIGSTOP) is killed on the second
    signal; its job goes back to the queue at the newest checkpoint, not left `running` for the reclaim."""
    _skip_unless(fault_server, "sqlite")
    job_id, store, checkpointed = _frozen_training(fault_server, train_jsonl)
    try:
        code, seconds = _stop_and_time(fault_server, False, signals=2)
        assert code == 0 and seconds < 10, f"exit {code} after {seconds:.1f} s"
        job = store.get_job(job_id)
        assert job["status"] == "queued" and job["step"] == checkpointed
    finally:
        store.dispose()
    fault_server.start()
    messages = finish_and_audit(fault_server, job_id, 60)
    assert f"Server stopped before the training reached a step boundary; job requeued to resume from step " \
           f"{checkpointed}" in messages


def test_grace_period_runs_out_then_the_stop_is_immediate(fault_server, train_jsonl):
    _skip_unless(fault_server, "sqlite")
    fault_server.stop()
    fault_server.extra = [*fault_server.extra, "--shutdown-grace-seconds", "2"]
    fault_server.start()
    job_id, store, checkpointed = _frozen_training(fault_server, train_jsonl)
    try:
        code, seconds = _stop_and_time(fault_server, False)
        assert code == 0 and 2 <= seconds < 12, f"exit {code} after {seconds:.1f} s (grace 2 s)"
        assert store.get_job(job_id)["status"] == "queued" and store.get_job(job_id)["step"] == checkpointed
    finally:
        store.dispose()
        fault_server.extra = fault_server.extra[:-2]
    fault_server.start()
    finish_and_audit(fault_server, job_id, 60)
