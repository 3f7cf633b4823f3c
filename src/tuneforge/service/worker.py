"""A worker process: claims queued jobs one at a time and runs each training attempt in its own subprocess
(`runner.py`), keeping the job's heartbeat, passing on cancel and pause, and recording how the attempt
ended. `python -m tuneforge.service.worker` (started by `tuneforge serve --workers N`).

Attempts are forked (`fork_attempts`, the default): when the first job is queued, the worker imports the
training stack (torch, transformers, peft: ~5 s of CPU) once, and each attempt is a child forked from it,
which starts training at once. The worker itself never trains, so no attempt inherits another's state.

Survival rules:
- a job whose worker has been silent for `reclaim_after_seconds` is requeued by any worker and resumes
  from its newest complete checkpoint (a kill -9 of a worker or of the whole server loses at most the
  steps since that checkpoint);
- a training subprocess that dies (kill -9, out of memory) is retried; attempts that end without a new
  checkpoint count, and after `max_attempts` of them the job fails;
- every status change is a compare-and-swap that also requires this worker to still hold the job.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tuneforge.errors import TuneforgeError, error_from_record
from tuneforge.process import die_with_parent, fork_call
from tuneforge.service.errors import job_error
from tuneforge.service.context import ServiceContext
from tuneforge.service.jobs.service import add_event, event, ft_model_name, validate_files
from tuneforge.service.runner import EXIT_FAILED, EXIT_OK, EXIT_STOPPED, PREFERENCE_METRICS, job_dir, openai_metrics
from tuneforge.service.settings import ServiceSettings
from tuneforge.service.storage.store import now
from tuneforge.training.entry import read_result
from tuneforge.training.run_dir import RunDir

log = logging.getLogger("tuneforge.service.worker")
VALIDATION_GRACE_SECONDS = 60
def results_csv(run: RunDir) -> bytes:
    """OpenAI's results file: step, train_loss, train_accuracy, valid_loss, valid_mean_token_accuracy (its one
    name that differs from the metrics events': train_accuracy); a DPO job's preference metrics after them."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    rows = [openai_metrics(r) for r in run.read_metrics()]
    extra = [k for k in PREFERENCE_METRICS.values() if any(k in m for m in rows)]
    writer.writerow(["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy", *extra])
    for m in rows:
        writer.writerow(["" if m.get(k) is None else m[k] for k in ("step", "train_loss", "train_mean_token_accuracy",
                                                                    "valid_loss", "valid_mean_token_accuracy", *extra)])
    return out.getvalue().encode()


# The before/after event's figure: the first of these both models have (the task's own measure before the loss).
SUMMARY_METRICS = ("accuracy", "reward_accuracy", "entity_f1", "chrf", "token_f1", "token_accuracy", "loss")


def client_report(job: dict, run: RunDir) -> tuple[bytes, bytes, str] | None:
    """A finished run's before/after report as its owner gets it: report.json and report.md with the server's paths
    replaced by the names the client knows (the validation file's id, the model's name), and a one-line summary
    for the job's events. None when the run wrote no report."""
    from tuneforge.service.extensions.job_specs import without_paths_in

    if not run.report_json.is_file():
        return None
    spec = run.read_spec()
    known = {str(run.path): "<run folder>", spec.model: job["model"]}
    if spec.eval is not None:
        known[spec.eval.data] = job["validation_file"] or "<validation file>"
    report = without_paths_in(json.loads(run.report_json.read_text()), known)
    markdown = run.report.read_text() if run.report.is_file() else ""
    # the report's pictures stay in the run folder: their links would point nowhere
    markdown = "\n".join(line for line in markdown.splitlines() if not line.startswith("!["))
    base, tuned = report.get("base") or {}, report.get("fine_tuned") or {}
    key = next((k for k in SUMMARY_METRICS if isinstance(base.get(k), (int, float))
                and isinstance(tuned.get(k), (int, float))), None)
    line = f"Before/after report on {base.get('examples', '?')} held-out examples"
    line += f": {key} {base[key]:.4g} -> {tuned[key]:.4g}" if key else ""
    if key not in (None, "loss") and "loss" in base and "loss" in tuned:
        line += f", loss {base['loss']:.4g} -> {tuned['loss']:.4g}"
    return (json.dumps(report, indent=2, ensure_ascii=False).encode(),
            (without_paths_in(markdown, known) + "\n").encode(), line + " (report.json, report.md in result_files)")


class Worker:
    def __init__(self, ctx: ServiceContext, worker_id: str | None = None):
        self.ctx = ctx
        self.s = ctx.settings
        self.id = worker_id or f"worker-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.stopping = False  # SIGTERM/SIGINT: the training checkpoints at its next step, then the job is requeued
        self.stop_now = False  # SIGUSR1 (the server's grace period ran out): kill the training, requeue at once
        # None: attempts will be forked once the training stack is imported here; True: it is; False: each attempt
        # is a fresh process (fork_attempts off, or the import failed here: the attempt then reports why)
        self.forking: bool | None = None if self.s.fork_attempts else False

    # ---------------------------------------------------------------- the loop

    def run_forever(self) -> None:
        log.info("%s started", self.id)
        while not self.stopping:
            self.reclaim()
            if self.forking is None and self.ctx.store.has_queued_job():
                self.preload()  # before the claim: a job this worker holds is never left without heartbeats
            job = self.ctx.store.claim_next_job(self.id, self.s.max_running_jobs_per_org)
            if job is None:
                time.sleep(self.s.poll_seconds)
                continue
            self.run_job(job)
        log.info("%s stopped", self.id)

    def preload(self) -> None:
        """Import what every training attempt imports, once: each attempt forked from here skips it."""
        started = time.time()
        try:
            import peft  # noqa: F401  (the methods' adapters)
            import torch

            import tuneforge.api  # noqa: F401
            import tuneforge.training.recipe  # noqa: F401
        except Exception:  # noqa: BLE001 — a broken install: each attempt then fails and says so in its job
            log.exception("%s could not import the training stack; training attempts start as fresh processes",
                          self.id)
            self.forking = False
            return
        if torch.cuda.is_initialized():  # a fork cannot take a CUDA context along: fresh processes, then
            log.warning("%s: CUDA was initialized while importing; training attempts start as fresh processes",
                        self.id)
            self.forking = False
            return
        from tuneforge.process import freeze_loaded_objects

        freeze_loaded_objects()  # shared with every fork, and never scanned by their collector
        self.forking = True
        log.info("%s imported the training stack in %.1f s; training attempts are forked from it", self.id,
                 time.time() - started)

    def reclaim(self) -> None:
        """Requeue running jobs whose worker went silent; finish validating jobs whose API request died."""
        cutoff = time.time() - self.s.reclaim_after_seconds
        for job in self.ctx.store.stale_running_jobs(cutoff):
            step = job["step"]
            if job["requested"] in ("cancel", "pause"):
                target = "cancelled" if job["requested"] == "cancel" else "paused"
                extra = {"finished_at": now()} if target == "cancelled" else {}
                self.ctx.store.reclaim(job["id"], cutoff, target, requested=None, estimated_finish=None, **extra,
                                       event=event(job["id"], f"Job {target} (its worker stopped responding at step "
                                                   f"{step})", dedup=f"reclaim:{job['heartbeat_at']}"))
            elif job["attempts"] + 1 >= self.s.max_attempts:
                error = {"code": "training_crashed", "param": None,
                         "message": f"training stopped responding {job['attempts'] + 1} times without progress"}
                self.ctx.store.reclaim(job["id"], cutoff, "failed", error=error, finished_at=now(),
                                       event=event(job["id"], error["message"], level="error", dedup="failed"))
            else:
                self.ctx.store.reclaim(job["id"], cutoff, "queued", attempts=job["attempts"] + 1, estimated_finish=None,
                                       event=event(job["id"], "Worker stopped responding; job requeued to resume "
                                                   f"from step {step}", level="warn",
                                                   dedup=f"reclaim:{job['heartbeat_at']}"))
        for job in self.ctx.store.stale_validating_jobs(now() - VALIDATION_GRACE_SECONDS):
            validate_files(self.ctx, job["id"])

    # ---------------------------------------------------------------- one attempt

    def run_job(self, job: dict) -> None:
        job_id = job["id"]
        folder = job_dir(self.ctx, job_id)
        folder.mkdir(parents=True, exist_ok=True)
        attempt = sum(1 for _ in folder.glob("attempt-*.log")) + 1
        add_event(self.ctx, job_id, f"Training attempt {attempt} started by {self.id}",
                  dedup=f"attempt:{attempt}:{self.id}")
        proc = self.start_attempt(job_id, folder / f"attempt-{attempt}.log")
        requested = None
        last_beat = time.time()
        while True:
            try:
                code = proc.wait(timeout=self.s.poll_seconds)
                break
            except subprocess.TimeoutExpired:
                pass
            if time.time() - last_beat >= self.s.heartbeat_seconds:
                state = self.ctx.store.heartbeat(job_id, self.id)
                last_beat = time.time()
            else:
                row = self.ctx.store.get_job(job_id)
                held = row and row["status"] == "running" and row["worker_id"] == self.id
                state = {"requested": row["requested"]} if held else None
            if state is None:  # reclaimed by another worker: this attempt no longer counts
                log.warning("%s lost job %s; stopping its training", self.id, job_id)
                proc.kill()
                proc.wait()
                return
            if self.stop_now:
                proc.kill()
                proc.wait()
                self._requeue_now(job_id)
                return
            want = state["requested"] or ("shutdown" if self.stopping else None)
            if want and requested is None:
                requested = want
                proc.send_signal(signal.SIGTERM)  # the runner checkpoints at the next step boundary
        self.finish(job, code, folder)

    def start_attempt(self, job_id: str, log_file: Path):
        """The attempt's process (Popen-like): forked from this worker once it has preloaded, else a fresh
        `python -m tuneforge.service.runner JOB_ID WORKER_ID`; `ps` shows both as that command line."""
        command = [sys.executable, "-m", "tuneforge.service.runner", job_id, self.id]
        if self.forking:
            from tuneforge.service import runner

            return fork_call(lambda: runner.main([job_id, self.id]), output=log_file, title=" ".join(command))
        with open(log_file, "ab") as out:
            return subprocess.Popen(command, env={**os.environ, **self.s.to_env()}, stdout=out,
                                    stderr=subprocess.STDOUT, preexec_fn=die_with_parent())

    def finish(self, job: dict, code: int, folder: Path) -> None:
        job_id, store = job["id"], self.ctx.store
        row = store.get_job(job_id)
        requested = row["requested"] if row else None
        if code == EXIT_OK:
            self._succeeded(job, folder)
        elif code == EXIT_STOPPED and requested in ("cancel", "pause"):
            target = "cancelled" if requested == "cancel" else "paused"
            extra = {"finished_at": now()} if target == "cancelled" else {}
            dedup = "cancelled" if target == "cancelled" else f"paused:{row['step']}:{int(time.time())}"
            store.finish_attempt(job_id, self.id, target, requested=None, estimated_finish=None, **extra,
                                 event=event(job_id, f"Job {target} at step {row['step']}", dedup=dedup))
        elif code == EXIT_STOPPED:  # this worker is shutting down: another (or the next start) resumes it
            store.finish_attempt(job_id, self.id, "queued", estimated_finish=None,
                                 event=event(job_id, f"Worker shutting down; job requeued at step {row['step']}",
                                             dedup=f"requeued:{row['step']}:{int(time.time())}"))
        elif code == EXIT_FAILED:
            self._failed(job_id, folder)
        else:  # killed or crashed: retry unless it keeps failing without progress
            attempts = row["attempts"] + 1
            if attempts >= self.s.max_attempts:
                error = {"code": "training_crashed", "param": None,
                         "message": f"the training process ended unexpectedly {attempts} times without progress "
                                    f"(last exit status {code}; its logs are in the job's folder on the server)"}
                store.finish_attempt(job_id, self.id, "failed", error=error, finished_at=now(), attempts=attempts,
                                     event=event(job_id, error["message"], level="error", dedup="failed"))
            else:
                store.finish_attempt(job_id, self.id, "queued", attempts=attempts, estimated_finish=None,
                                     event=event(job_id, f"Training process ended unexpectedly (exit status {code}); "
                                                 f"the job will resume from step {row['step']}", level="warn",
                                                 dedup=f"crash:{row['step']}:{attempts}:{int(time.time())}"))

    def _requeue_now(self, job_id: str) -> None:
        """The immediate stop: the training was killed mid-step; the job goes back to the queue at its newest
        checkpoint, so the next start resumes it without waiting for the reclaim timeout."""
        row = self.ctx.store.get_job(job_id)
        step = row["step"] if row else 0
        self.ctx.store.finish_attempt(job_id, self.id, "queued", estimated_finish=None, event=event(
            job_id, f"Server stopped before the training reached a step boundary; job requeued to resume from "
                    f"step {step}", level="warn", dedup=f"requeued-now:{step}:{int(time.time())}"))

    def _succeeded(self, job: dict, folder: Path) -> None:
        from tuneforge.service.files.service import add_result_file

        job_id, store = job["id"], self.ctx.store
        summary = read_result(folder)["summary"]
        org = store.get_org(job["org_id"])
        name = ft_model_name(job["model"], org["name"], job["suffix"], job_id)
        run = RunDir(summary["output_dir"])
        results = [add_result_file(self.ctx, job["org_id"], job_id, "step_metrics.csv", results_csv(run))]
        report = client_report(job, run)
        if report is not None:
            as_json, as_markdown, line = report
            results += [add_result_file(self.ctx, job["org_id"], job_id, "report.json", as_json),
                        add_result_file(self.ctx, job["org_id"], job_id, "report.md", as_markdown)]
            add_event(self.ctx, job_id, line, dedup="report")
        store.insert_model({"id": name, "org_id": job["org_id"], "job_id": job_id, "base": job["model"],
                            "created_at": now()})
        add_event(self.ctx, job_id, f"New fine-tuned model created: {name}", dedup="model-created")
        store.finish_attempt(job_id, self.id, "succeeded", fine_tuned_model=name, finished_at=now(),
                             trained_tokens=summary["tokens_seen"], result_files=results, estimated_finish=None,
                             requested=None, step=summary["steps"],
                             event=event(job_id, "The job has successfully completed", dedup="succeeded"))

    def _failed(self, job_id: str, folder: Path) -> None:
        result = read_result(folder) or {}
        err = (error_from_record(result["error"]) if "error" in result
               else TuneforgeError("training failed (no error report)"))
        error = job_error(err)
        self.ctx.store.finish_attempt(job_id, self.id, "failed", error=error, finished_at=now(), estimated_finish=None,
                                      event=event(job_id, error["message"], level="error", dedup="failed"))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = ServiceContext.open(ServiceSettings.from_env())
    worker = Worker(ctx)

    def stop(signum, frame):
        worker.stopping = True

    def stop_now(signum, frame):
        worker.stopping = worker.stop_now = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, stop_now)
    worker.run_forever()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # stopped already: a late signal changes nothing
        signal.signal(sig, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
