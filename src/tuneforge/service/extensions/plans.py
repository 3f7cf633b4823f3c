"""The planner's verdict on a job request before the job exists (`POST /v1/tuneforge/plan`).

The request becomes the JobSpec the job would run (`build_job_spec`, the jobs API's own translation), its files
are checked by the engine's validator, and `tuneforge.api.plan` predicts the chosen method only. Planning runs
on one thread of its own (never the event loop or the request threadpool; a probe itself runs in a child
process), and each request shape is planned once: a repeat of the same request is answered from the cache,
and one that comes while the first is still planning waits on it. A plan can take minutes on a shape never
probed before, so the endpoint answers 202 with the planner's progress after `wait` seconds and the client
sends the same request again.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

from tuneforge.errors import TuneforgeError
from tuneforge.service.auth import Org
from tuneforge.service.context import ServiceContext
from tuneforge.service.errors import (InvalidRequest, NotFound, ServerError, TooManyRequests,
                                      without_server_paths)
from tuneforge.service.extensions.protocol import DataProblem, Plan, PlanRequest, Uncertainty, Verdict

# How far `tuneforge plan` has been from measured runs (docs/plan.md): peak memory within ±10 % on SmolLM2's
# 11 runs and ±13.5 % on the scenario specs, step time within ±11 % on SmolLM2 and +12 % on Phi-3-mini.
PEAK_MEMORY_UNCERTAINTY = 0.15
STEP_TIME_UNCERTAINTY = 0.15
MAX_UNFINISHED = 4  # distinct plans queued or running at once; beyond it 429
MAX_KEPT = 256  # finished plans kept (least recently asked for dropped first)
MAX_PROBLEMS = 50
PLAN_JOB_ID = "ftjob-plan"  # stands for the job not yet made (its run folder is never written)

log = logging.getLogger("tuneforge.service.plans")


@dataclass
class PlanEntry:
    """One request shape's plan: queued, running or done (`future` holds the verdict or the error)."""

    model: str
    method: str
    known_paths: dict[str, str]  # server path -> the name the client knows it by
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    progress: str = "checking the files"
    data_problems: list[DataProblem] | None = None
    future: Future = field(default_factory=Future)


class Planner:
    """Plans by request shape, one at a time on a daemon thread (a plan still running when the server stops
    is abandoned, not waited for)."""

    def __init__(self, max_unfinished: int = MAX_UNFINISHED, max_kept: int = MAX_KEPT):
        self.max_unfinished, self.max_kept = max_unfinished, max_kept
        self.entries: OrderedDict[str, PlanEntry] = OrderedDict()
        self.lock = threading.Lock()
        self.work: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None

    def entry(self, key: str, make) -> tuple[PlanEntry, bool]:
        """(the entry of `key`, whether it is new); `make()` builds a new one. 429 when too many are unfinished."""
        with self.lock:
            found = self.entries.get(key)
            if found is not None:
                self.entries.move_to_end(key)
                return found, False
            if sum(not e.future.done() for e in self.entries.values()) >= self.max_unfinished:
                raise TooManyRequests(f"the planner is busy with {self.max_unfinished} other plans; ask again in a "
                                      "minute", code="planner_busy", headers={"Retry-After": "30"})
            self.entries[key] = made = make()
            finished = [k for k, e in self.entries.items() if e.future.done()]
            for old in finished[: max(0, len(self.entries) - self.max_kept)]:
                del self.entries[old]
            return made, True

    def forget(self, key: str) -> None:
        with self.lock:
            self.entries.pop(key, None)

    def submit(self, key: str, entry: PlanEntry, plan) -> None:
        """Queue `plan(entry)` (its answer becomes the entry's verdict) for the planning thread."""
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="tuneforge-planner", daemon=True)
                self.thread.start()
        entry.progress = "waiting for the planner"
        self.work.put((key, entry, plan))

    def _run(self) -> None:
        while True:
            key, entry, plan = self.work.get()
            try:
                result = plan(entry)
            except TuneforgeError as e:  # the planner's refusal: kept, the same request gets the same answer
                entry.finished = time.monotonic()
                entry.future.set_exception(e)
            except Exception as e:  # noqa: BLE001 — our bug or the machine's: logged, and not kept
                log.exception("planning failed")
                self.forget(key)
                entry.finished = time.monotonic()
                entry.future.set_exception(e)
            else:
                entry.finished = time.monotonic()
                entry.future.set_result(result)


def planner_of(state) -> Planner:
    planner = getattr(state, "planner", None)
    if planner is None:
        planner = state.planner = Planner()
    return planner


def start(ctx: ServiceContext, planner: Planner, org: Org, req: PlanRequest) -> tuple[PlanEntry, bool]:
    """The entry planning `req` (made and queued if this shape is new) and whether it was already done.
    Checks what the jobs API would (the model, the files of this org, the spec, the operator's limits): a
    request the jobs API would refuse is refused here with the same message."""
    from tuneforge.service.jobs.service import build_job_spec

    if req.model not in ctx.settings.base_models:
        offered = ", ".join(sorted(ctx.settings.base_models))
        raise InvalidRequest(f"model: {req.model!r} cannot be fine-tuned on this server; available: {offered}",
                             param="model", code="model_not_available")
    files = {"training_file": req.training_file}
    if req.validation_file:
        files["validation_file"] = req.validation_file
    for param, file_id in files.items():
        row = ctx.store.get_file(org.id, file_id)
        if row is None:
            raise NotFound("file", file_id, param=param)
        if row["purpose"] != "fine-tune":
            raise InvalidRequest(f"{param}: file {file_id} has purpose {row['purpose']!r}, not 'fine-tune'",
                                 param=param, code="invalid_file_purpose")
    spec, _ = build_job_spec(ctx, req, PLAN_JOB_ID, seed=0)
    shape = spec.model_dump(mode="json")
    shape.pop("output_dir", None)
    shape["training"].pop("seed", None)
    shape["training"].pop("save_every", None)
    key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()
    known = {str(spec.model): req.model, str(spec.data.train): req.training_file}
    if spec.data.validation:
        known[str(spec.data.validation)] = req.validation_file
    entry, new = planner.entry(key, lambda: PlanEntry(req.model, spec.method, known))
    if not new:
        return entry, entry.future.done()
    try:
        entry.data_problems = data_problems(spec, files)
    except Exception as e:
        planner.forget(key)
        entry.future.set_exception(e)
        if isinstance(e, TuneforgeError):
            raise InvalidRequest(without_server_paths(str(e), known), code="invalid_file") from None
        raise
    if entry.data_problems:
        entry.progress = "the files have problems: a job on them would fail"
        entry.finished = time.monotonic()
        entry.future.set_result(None)
    else:
        planner.submit(key, entry, lambda e: verdict(plan_spec(spec, e)))
    return entry, False


def data_problems(spec, files: dict[str, str]) -> list[DataProblem]:
    """What the engine's validator finds in the spec's files (the job's own check: jobs/service.validate_files)."""
    from tuneforge.data.validate import validate_jsonl

    problems: list[DataProblem] = []
    for param, path in (("training_file", spec.data.train), ("validation_file", spec.data.validation)):
        if path is None:
            continue
        report = validate_jsonl(path, spec.task, spec.labels)
        problems += [DataProblem(param=param, file=files[param], line=p.line, field=p.field,
                                 message=without_server_paths(p.message, {str(path): files[param]}))
                     for p in report.errors[: MAX_PROBLEMS - len(problems)]]
    return problems


def plan_spec(spec, entry: PlanEntry):
    from tuneforge import api

    def progress(message: str) -> None:
        entry.progress = without_server_paths(message, entry.known_paths)

    entry.progress = f"planning {spec.method}"
    return api.plan(spec, methods=(spec.method,), progress=progress)


def verdict(plan) -> Verdict:
    """The Verdict of a Plan of one method (read through its documented `as_dict()`)."""
    from tuneforge.planning.plan import HEADROOM

    d = plan.as_dict()
    row = d["combinations"][0] if d["combinations"] else {}
    peak = row.get("predicted_peak_mb")
    low = round(peak * (1 - PEAK_MEMORY_UNCERTAINTY), 1) if peak is not None else None
    high = round(peak * (1 + PEAK_MEMORY_UNCERTAINTY), 1) if peak is not None else None
    return Verdict(device=d["device"], memory_mb=round(d["memory_mb"], 1), fits=row.get("fits"),
                   predicted_peak_mb=round(peak, 1) if peak is not None else None, peak_mb_low=low, peak_mb_high=high,
                   fits_at_high=high <= HEADROOM * d["memory_mb"] if high is not None else None,
                   predicted_step_seconds=row.get("predicted_step_seconds"),
                   predicted_run_seconds=row.get("predicted_run_seconds"), total_steps=d["total_steps"],
                   micro_batch=d["micro_batch"], trainable_params=row.get("trainable_params", 0),
                   total_params=row.get("total_params", 0),
                   gradient_checkpointing=row.get("gradient_checkpointing", False),
                   uncertainty=Uncertainty(peak_memory=PEAK_MEMORY_UNCERTAINTY, step_time=STEP_TIME_UNCERTAINTY),
                   note=without_server_paths(row.get("note", "the planner has no figures for this method")))


async def wait(entry: PlanEntry, seconds: float) -> None:
    """Until the entry is done or `seconds` pass, without blocking the event loop (the plan goes on either way)."""
    if seconds > 0 and not entry.future.done():
        await asyncio.wait({asyncio.wrap_future(entry.future)}, timeout=seconds)


def answer(entry: PlanEntry, cached: bool) -> tuple[int, Plan]:
    """(200 done | 202 running, the Plan). The planner's refusal is a 400 naming it."""
    done = entry.future.done()
    result = None
    if done:
        error = entry.future.exception()
        if isinstance(error, TuneforgeError):
            raise InvalidRequest("the planner could not plan this job: "
                                 + without_server_paths(str(error), entry.known_paths), code="plan_failed")
        if error is not None:
            raise ServerError("The planner had an error; ask again (it is logged on the server).")
        result = entry.future.result()
    elapsed = (entry.finished or time.monotonic()) - entry.started
    return (200 if done else 202), Plan(
        status="done" if done else "running", model=entry.model, method=entry.method,
        progress="done" if done and result is not None else entry.progress, elapsed_seconds=round(elapsed, 2),
        cached=cached, data_problems=entry.data_problems, verdict=result)
