"""One training attempt of one job, in its own process: `python -m tuneforge.service.runner JOB_ID`, or (the
default) a child forked from its worker, which imported the training stack once (`ps` shows it the same way).

Its own process because the engine sets process-wide state for some jobs (the QLoRA allocator setting,
layers patched in place, torch's thread pool) and one job must never inherit another's. It resumes from
the run's newest checkpoint when there is one, turns the engine's events into job events and checkpoint
rows (each deduplicated, so a resumed step is not recorded twice), and stops at the next step boundary
with a checkpoint on SIGTERM (the worker's cancel, pause or shutdown).

It also checks, about once a second, that its worker still holds the job: a worker that froze (SIGSTOP,
a stalled machine) may have lost the job to another, and two attempts must never write one run folder,
so the attempt then exits at once, writing nothing more.

It reports to its worker as the training entry does (training/entry.py): `result.json` in the job's folder
holds {"summary": ...} or {"error": an error record}, read back as the error's own type.
Exit status: 0 trained to the end, 3 stopped on request, 1 the job cannot run as specified (the error in
result.json), 2 an unexpected error (a bug: the traceback is in the log), 4 the job was taken over by another
worker.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from tuneforge.service.context import ServiceContext
from tuneforge.service.jobs.service import add_event, ft_model_name, new_id, prepare_base
from tuneforge.service.settings import ServiceSettings
from tuneforge.service.storage.store import now
from tuneforge.training.entry import RESULT, write_result
from tuneforge.training.events import RunEvent
from tuneforge.training.run_dir import (EVAL_ACCURACY, EVAL_LOSS, EVAL_REWARD_ACCURACY, EVAL_REWARD_MARGIN,
                                        LOGPS_CHOSEN, LOGPS_REJECTED, REWARD_ACCURACY, REWARD_MARGIN, TRAIN_ACCURACY,
                                        TRAIN_LOSS, RunDir)

EXIT_OK, EXIT_FAILED, EXIT_CRASHED, EXIT_STOPPED, EXIT_LOST = 0, 1, 2, 3, 4
ESTIMATE_EVERY_SECONDS = 2.0
OWNER_CHECK_SECONDS = 1.0
# The engine's step metrics under the names OpenAI's metrics events and checkpoints use.
OPENAI_METRICS = {TRAIN_LOSS: "train_loss", TRAIN_ACCURACY: "train_mean_token_accuracy", EVAL_LOSS: "valid_loss",
                  EVAL_ACCURACY: "valid_mean_token_accuracy"}
# DPO jobs' step metrics besides the loss (present only in their records), in the same style.
PREFERENCE_METRICS = {REWARD_ACCURACY: "train_reward_accuracy", REWARD_MARGIN: "train_reward_margin",
                      LOGPS_CHOSEN: "train_chosen_logprob", LOGPS_REJECTED: "train_rejected_logprob",
                      EVAL_REWARD_ACCURACY: "valid_reward_accuracy", EVAL_REWARD_MARGIN: "valid_reward_margin"}


def openai_metrics(record: dict) -> dict:
    """A step's metrics (a `step` event's data, a metrics.jsonl row) as OpenAI names them; absent ones are None
    (a DPO job's preference metrics are there only when the record has them)."""
    return {"step": record["step"], **{name: record.get(ours) for ours, name in OPENAI_METRICS.items()},
            **{name: record[ours] for ours, name in PREFERENCE_METRICS.items() if ours in record}}


def job_dir(ctx: ServiceContext, job_id: str) -> Path:
    return ctx.settings.jobs_dir / job_id


def public_text(text: str, job: dict, spec) -> str:
    """A message for the job's owner: server paths replaced by the file ids and names the client knows."""
    for path, name in ((spec.data.train, f"training_file {job['training_file']}"),
                       (spec.data.validation, f"validation_file {job['validation_file']}"),
                       (spec.output_dir, "the job's run folder"), (str(Path(spec.output_dir).parent), "the job")):
        if path:
            text = text.replace(str(path), name)
    return text


class JobEvents:
    """The engine's RunEvents -> job events, checkpoint rows and the job's progress fields."""

    def __init__(self, ctx: ServiceContext, job: dict, model_name: str, spec, worker_id: str | None = None):
        self.ctx, self.job, self.model_name, self.spec, self.worker_id = ctx, job, model_name, spec, worker_id
        self.last_owner_check = time.time()
        self.metrics: dict[int, dict] = {}
        self.started = time.time()
        self.first_step: int | None = None
        self.last_estimate = 0.0
        self.training = False  # the engine's loop has started (a stop now waits for the step boundary)

    def __call__(self, e: RunEvent) -> None:
        job_id = self.job["id"]
        self._still_ours()
        if e.kind == "started":
            self.training = True
            self.ctx.store.update_job(job_id, total_steps=e.total_steps)
            if e.step:
                add_event(self.ctx, job_id, f"Fine-tuning resumed from step {e.step}/{e.total_steps}",
                          dedup=f"resumed:{e.step}:{self.job['attempts']}:{int(self.started)}")
            else:
                add_event(self.ctx, job_id, "Fine-tuning job started", dedup="started")
        elif e.kind == "step":
            self._step(e)
        elif e.kind == "checkpoint":
            self._checkpoint(e)
        elif e.kind == "warning":
            add_event(self.ctx, job_id, public_text(e.message, self.job, self.spec), level="warn")

    def _still_ours(self) -> None:
        if self.worker_id is None or time.time() - self.last_owner_check < OWNER_CHECK_SECONDS:
            return
        self.last_owner_check = time.time()
        row = self.ctx.store.get_job(self.job["id"])
        if row is None or row["status"] != "running" or row["worker_id"] != self.worker_id:
            logging.getLogger("tuneforge.service.runner").warning("job %s is no longer held by %s; exiting",
                                                                  self.job["id"], self.worker_id)
            os._exit(EXIT_LOST)

    def _step(self, e: RunEvent) -> None:
        d = e.data
        data = {**openai_metrics({**d, "step": e.step}), "total_steps": e.total_steps}
        self.metrics[e.step] = data
        message = f"Step {e.step}/{e.total_steps}: training loss={d[TRAIN_LOSS]:.4f}"
        if d.get(REWARD_ACCURACY) is not None:
            message += f", reward accuracy={d[REWARD_ACCURACY]:.2f}, reward margin={d[REWARD_MARGIN]:.4f}"
        if d.get(EVAL_LOSS) is not None:
            message += f", validation loss={d[EVAL_LOSS]:.4f}"
        add_event(self.ctx, self.job["id"], message, type="metrics", data=data, dedup=f"step:{e.step}")
        if self.first_step is None:
            self.first_step, self.started = e.step, time.time()
        elif time.time() - self.last_estimate >= ESTIMATE_EVERY_SECONDS:  # from this attempt's measured pace
            per_step = (time.time() - self.started) / max(e.step - self.first_step, 1)
            self.ctx.store.update_job(self.job["id"], estimated_finish=int(time.time() + per_step * (e.total_steps - e.step)))
            self.last_estimate = time.time()

    def _checkpoint(self, e: RunEvent) -> None:
        job_id, step = self.job["id"], e.step
        self._record_checkpoint(step, self.metrics.get(step, {"step": step}))
        self.reconcile(RunDir(self.spec.output_dir), sweep=False)
        self.ctx.store.update_job(job_id, step=step, attempts=0)  # progress: a crash from here costs no attempt

    def _record_checkpoint(self, step: int, metrics: dict) -> None:
        """One checkpoint row and its event; both idempotent (a replay after a crash changes nothing)."""
        job_id = self.job["id"]
        metrics = {k: v for k, v in metrics.items() if k != "total_steps"}
        self.ctx.store.upsert_checkpoint({"id": new_id("ftckpt"), "job_id": job_id, "org_id": self.job["org_id"],
                                         "step": step, "created_at": now(), "metrics": metrics,
                                         "model_name": f"{self.model_name}:ckpt-step-{step}"})
        add_event(self.ctx, job_id, f"Checkpoint created at step {step}", dedup=f"checkpoint:{step}")

    def reconcile(self, run: RunDir, *, sweep: bool = True) -> None:
        """Make the job's checkpoint rows what the run folder holds. A kill between a checkpoint's rename into
        place and its event leaves a checkpoint without a row (and, mid-prune, a `.tmp-delete-*` folder): the
        next attempt calls this before it trains, and every attempt after it trains."""
        from tuneforge.training.checkpoint import sweep_leftovers

        if sweep:
            sweep_leftovers(run.path)
        on_disk = [c.step for c in run.checkpoints()]
        logged: dict[int, dict] = {}  # what a killed attempt logged (a step's rows merged: train, then validation)
        for row in run.read_metrics():
            if row["step"] in set(on_disk) - set(self.metrics):
                merged = logged.setdefault(row["step"], openai_metrics(row))
                merged.update({k: v for k, v in openai_metrics(row).items() if v is not None})
        for step in on_disk:
            self._record_checkpoint(step, self.metrics.get(step) or logged.get(step) or {"step": step})
        self.ctx.store.keep_checkpoints(self.job["id"], on_disk)


def free_port() -> int:
    """A TCP port nothing listens on now (the ranks' rendezvous binds it moments later)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(job_id: str, worker_id: str | None = None) -> int:
    from tuneforge import api
    from tuneforge.errors import Stopped, TuneforgeError
    from tuneforge.spec import JobSpec
    from tuneforge.training.allocator import return_big_buffers_to_os, returns_big_buffers
    from tuneforge.training.events import StopRequest

    settings = ServiceSettings.from_env()
    ctx = ServiceContext.open(settings, migrate=False)
    job = ctx.store.get_job(job_id)
    folder = job_dir(ctx, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULT).unlink(missing_ok=True)  # what an earlier attempt left
    stop = StopRequest()
    events = None

    def on_signal(signum, frame) -> None:
        """Cancel, pause or shutdown: during training, stop at the next step boundary with a checkpoint; before it
        (loading the model, reading data) there is no progress to keep, so leave at once."""
        stop.request(signal.Signals(signum).name)
        if not stop.armed and (events is None or not events.training):
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        spec = JobSpec.model_validate(job["spec"])
        if spec.distributed is not None and spec.distributed.world_size > 1:  # this job's own rendezvous port
            spec = spec.model_copy(update={"distributed": spec.distributed.model_copy(
                update={"master_port": free_port()})})
        if settings.training_threads:
            import torch

            torch.set_num_threads(settings.training_threads)
        if returns_big_buffers(spec):
            return_big_buffers_to_os()  # process-wide: this process is this job's alone
        org = ctx.store.get_org(job["org_id"])
        events = JobEvents(ctx, job, ft_model_name(job["model"], org["name"], job["suffix"], job_id), spec, worker_id)
        if prepare_base(ctx, job, spec):  # a job on an org's fine-tuned adapter: merged into its base, once
            add_event(ctx, job_id, f"Merged {job['model']} into the base weights this job trains on", dedup="merged")
        run = RunDir(spec.output_dir)
        resume = run.latest_checkpoint() is not None
        if resume:
            events.reconcile(run)
        summary = api.train(spec, resume=resume, on_event=events, stop=stop, progress=False)
        events.reconcile(run)
    except (KeyboardInterrupt, Stopped):  # stopped before training began, or outside a step (nothing to save)
        return EXIT_STOPPED
    except TuneforgeError as e:  # said to the job's owner: no server paths, problems without our file names
        spec = JobSpec.model_validate(job["spec"])
        record = e.to_record()
        record.update(message=public_text(record["message"], job, spec),
                      problems=[{**p, "source": None} for p in record["problems"]])
        write_result(folder, {"error": record})
        return EXIT_FAILED
    write_result(folder, {"summary": summary.model_dump(mode="json")})
    return EXIT_OK if summary.status == "succeeded" else EXIT_STOPPED


def main(argv: list[str] | None = None) -> int:
    """`python -m tuneforge.service.runner JOB_ID [WORKER_ID]`, or the same arguments in a child its worker forked
    (service/worker.py)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print("usage: python -m tuneforge.service.runner JOB_ID [WORKER_ID]", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(argv[0], argv[1] if len(argv) == 2 else None)
    except Exception:
        logging.getLogger("tuneforge.service.runner").exception("training attempt crashed")
        return EXIT_CRASHED
    finally:
        # The attempt is over and its exit status says how. A stop signal may still come (a group SIGTERM reaches
        # this process and its worker, which passes it on): Python restores the default action while it shuts
        # down, which would turn this exit into "killed by SIGTERM". Ignored, it cannot.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
