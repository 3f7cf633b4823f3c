"""Fine-tuning jobs: an OpenAI job request becomes a tuneforge JobSpec (the same one the CLI runs), its
files are checked by the engine's validator, and the job is queued for a worker. Testable without HTTP.

`method.type` supervised trains task chat; dpo trains task preference (files in OpenAI's DPO format), beta
among its hyperparameters. A job's `model` is one of the server's base models or one of the org's own
fine-tuned models (`ft:...`, supervised first and then DPO, as OpenAI recommends): an adapter fine-tune is
merged into its base once, in the job's folder (`base/`, by the training attempt), and the new adapter is
trained on top, so the adapter switched off is that fine-tune (DPO's reference) and the served model is what
was trained; a full fine-tune's weights are the base as they are."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import secrets
from typing import Any

from tuneforge.errors import SpecError
from tuneforge.service.auth import Org
from tuneforge.service.context import ServiceContext
from tuneforge.service.errors import InvalidRequest, NotFound, TooManyRequests
from tuneforge.service.files.service import file_path
from tuneforge.service.idempotency import idempotent, payload_hash
from tuneforge.service.jobs.protocol import (MAX_EVAL_EXAMPLES, MAX_EVAL_NEW_TOKENS, Checkpoint, CheckpointList,
                                             EventList, Job, JobCreate, JobEvalIn, JobList, checkpoint_object,
                                             event_object, job_object)
from tuneforge.service.storage.store import now

BASE_LR = 2.0e-4  # what learning_rate_multiplier multiplies: the engine's default peak learning rate
MIN_EXAMPLES = 10  # as OpenAI: fewer is `invalid_n_examples`
# Parts of the spec the service owns (a job may not point the engine at other files, folders, hosts or ports),
# each with what the client can do instead.
SERVICE_OWNED = {
    "model": "set the top-level `model` to one of this server's base models (GET /v1/models)",
    "output_dir": "the service keeps each job's run folder itself",
    "data.train": "upload the file and give its id as `training_file`",
    "data.validation": "upload the file and give its id as `validation_file`",
    "eval.data": "the before/after report evaluates the job's own held-out file: upload it and give its id as "
                 "`validation_file`",
    "trust_remote_code": "this server never runs code that comes with a model; choose a base model from "
                         "GET /v1/models",
    "distributed.nnodes": "jobs train on this server's machine only (use tuneforge.distributed.nproc for its ranks)",
    "distributed.node_rank": "jobs train on this server's machine only",
    "distributed.master_addr": "the service sets up the ranks' rendezvous itself",
    "distributed.master_port": "the service picks a free port for each job's ranks",
    "distributed.deepspeed_config": "a DeepSpeed JSON file is the operator's; the spec's own fields set the "
                                    "strategy, offload and batch sizes",
}
JOB_STATES = {"cancel": "cancelled", "pause": "paused", "resume": "resumed"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def ft_model_name(base: str, org_name: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's name for a job's model; a fine-tune of a fine-tune is named after the base model, as OpenAI does."""
    if base.startswith("ft:"):
        base = base.split(":")[1]
    return f"ft:{base}:{org_name}:{suffix or ''}:{job_id.split('-', 1)[1][:8]}"


def event(job_id: str, message: str, *, level: str = "info", type: str = "message", data: dict | None = None,
          dedup: str | None = None) -> dict:
    """A job event row. `dedup` makes it unique per job: a second one (a resumed step, a retried transition)
    is dropped."""
    return {"id": new_id("ftevent"), "job_id": job_id, "created_at": now(), "level": level, "message": message,
            "type": type, "data": data,
            "dedup": dedup or hashlib.sha256(f"{type}\0{message}".encode()).hexdigest()[:40]}


def add_event(ctx: ServiceContext, job_id: str, message: str, **kw) -> bool:
    """Record a job event once (see `event`)."""
    return ctx.store.add_event(event(job_id, message, **kw))


# ---------------------------------------------------------------- create


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.append(f"{prefix}{k}")
        if isinstance(v, dict):
            keys += _flat_keys(v, f"{prefix}{k}.")
    return keys


def method_type(req: JobCreate) -> str:
    return req.method.type if req.method is not None else "supervised"


def _hyperparameters(req: JobCreate) -> tuple[dict, str]:
    """The request's hyperparameters (method.supervised, method.dpo or the legacy top-level field) and their param
    path."""
    method = req.method
    if method is not None and method.type == "reinforcement":
        raise InvalidRequest("method.type: 'reinforcement' is not available on this server; use method.type "
                             "'supervised' or 'dpo'", param="method.type", code="unsupported_method")
    other = {"supervised": "dpo", "dpo": "supervised"}.get(method.type) if method is not None else None
    if other and getattr(method, other) is not None:
        raise InvalidRequest(f"method.{other}: a {method.type} job reads method.{method.type}; move its "
                             "hyperparameters there", param=f"method.{other}")
    if method is not None and method.type == "dpo":
        if req.hyperparameters is not None:
            raise InvalidRequest("hyperparameters: a dpo job takes its hyperparameters in method.dpo.hyperparameters",
                                 param="hyperparameters")
        nested = method.dpo.hyperparameters if method.dpo else None
        return (nested.model_dump(exclude_none=True) if nested else {}), "method.dpo.hyperparameters"
    nested = method.supervised.hyperparameters if method and method.supervised else None
    if nested is not None and req.hyperparameters is not None:
        raise InvalidRequest("give hyperparameters in method.supervised.hyperparameters or (deprecated) top-level "
                             "hyperparameters, not both", param="hyperparameters")
    if nested is not None:
        return nested.model_dump(exclude_none=True), "method.supervised.hyperparameters"
    return (req.hyperparameters.model_dump(exclude_none=True) if req.hyperparameters else {}), "hyperparameters"


def base_model_of(ctx: ServiceContext, org: Org | None, name: str, job_id: str) -> str:
    """The JobSpec `model` for job `job_id` on `name`: a base model's reference, or for the org's own fine-tuned
    model the folder its base weights are (a full fine-tune's model/) or will be (the job's base/, merged by the
    training attempt: `prepare_base`). 400 for anything else."""
    if name in ctx.settings.base_models:
        return ctx.settings.base_models[name]
    row = ctx.store.get_model(name, org.id) if org is not None else None
    if row is None:
        offered = ", ".join(sorted(ctx.settings.base_models))
        raise InvalidRequest(f"model: {name!r} cannot be fine-tuned on this server; available: {offered}, or one of "
                             "your fine-tuned models (ft:...)", param="model", code="model_not_available")
    parent = _parent_run(ctx, row)
    method = parent.read_spec().method
    if method == "prompt_tuning":
        raise InvalidRequest(f"model: {name} is a prompt-tuning adapter, which cannot be merged into its base to "
                             "train on; fine-tune a base model or a lora/dora/qlora/ia3/full fine-tune", param="model",
                             code="model_not_available")
    return str(parent.output("full")) if method == "full" else str(ctx.settings.jobs_dir / job_id / "base")


def _parent_run(ctx: ServiceContext, model_row: dict):
    from tuneforge.training.run_dir import RunDir

    return RunDir(ctx.settings.jobs_dir / model_row["job_id"] / "run")


def prepare_base(ctx: ServiceContext, job: dict, spec) -> bool:
    """Before a job on a fine-tuned adapter model trains: its adapter merged into its base, once, in the job's
    folder (an earlier attempt's merge is kept). True when it merged now."""
    from pathlib import Path

    from tuneforge import api
    from tuneforge.errors import ModelError

    base = Path(spec.model)
    if job["model"] in ctx.settings.base_models or base != ctx.settings.jobs_dir / job["id"] / "base":
        return False
    if (base / "config.json").is_file():
        return False
    row = ctx.store.get_model(job["model"], job["org_id"])
    if row is None:
        raise ModelError(f"model {job['model']} was deleted before this job started; it cannot be trained on")
    api.merge(_parent_run(ctx, row).path, base)
    return True


def _eval_section(ctx: ServiceContext, req: JobCreate, value: Any) -> dict:
    """`tuneforge.eval` of a request (before_after, max_new_tokens, examples; bounded by JobEvalIn) as the spec's
    `eval`, its data the job's validation_file. 400 naming the field on a problem."""
    from pydantic import ValidationError

    hint = f"; it takes before_after, max_new_tokens (1 to {MAX_EVAL_NEW_TOKENS}) and examples (0 to {MAX_EVAL_EXAMPLES})"
    if not isinstance(value, dict):
        raise InvalidRequest(f'tuneforge.eval: give an object, e.g. {{"before_after": true}}{hint}',
                             param="tuneforge.eval", code="invalid_job_spec")
    try:
        section = JobEvalIn.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        param = "tuneforge.eval" + (f".{where}" if where else "")
        raise InvalidRequest(f"{param}: {first.get('msg', 'invalid')}{hint}", param=param,
                             code="invalid_job_spec") from None
    if not req.validation_file:
        raise InvalidRequest("tuneforge.eval: the before/after report evaluates held-out data, the job's "
                             "validation_file: upload a JSONL file (purpose 'fine-tune') and give its id as "
                             "`validation_file`, or leave out tuneforge.eval", param="validation_file",
                             code="invalid_job_spec")
    return {**section.model_dump(), "data": str(file_path(ctx, req.validation_file))}


def build_job_spec(ctx: ServiceContext, req: JobCreate, job_id: str, seed: int,
                   org: Org | None = None) -> tuple[Any, dict]:
    """The tuneforge JobSpec for a request, and the resolved hyperparameters. 400 naming the `param` on a problem.
    `org`: whose fine-tuned models `req.model` may name (None: base models only)."""
    from tuneforge.spec import build_spec

    hp, hp_param = _hyperparameters(req)
    dpo = method_type(req) == "dpo"
    ext = req.tuneforge or {}
    owned = [k for k in _flat_keys(ext) if k in SERVICE_OWNED]
    if owned:
        raise InvalidRequest(f"tuneforge.{owned[0]}: set by the service, not by a request; {SERVICE_OWNED[owned[0]]}",
                             param=f"tuneforge.{owned[0]}", code="service_owned_field")
    training_ext = ext.get("training", {}) if isinstance(ext.get("training"), dict) else {}
    for name, key in (("n_epochs", "epochs"), ("batch_size", "batch_size"), ("learning_rate_multiplier", "lr")):
        if hp.get(name, "auto") != "auto" and key in training_ext:
            raise InvalidRequest(f"{hp_param}.{name} and tuneforge.training.{key} both set; give one",
                                 param=f"{hp_param}.{name}")
    training: dict[str, Any] = {"seed": seed, "save_every": ctx.settings.default_save_every}
    for name, key in (("n_epochs", "epochs"), ("batch_size", "batch_size")):
        value = hp.get(name, "auto")
        if value != "auto":
            if not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"{hp_param}.{name}: must be a whole number of at least 1 or 'auto'",
                                     param=f"{hp_param}.{name}")
            training[key] = value
    if dpo and hp.get("beta", "auto") != "auto" and "beta" in (ext.get("preference") or {}):
        raise InvalidRequest(f"{hp_param}.beta and tuneforge.preference.beta both set; give one",
                             param=f"{hp_param}.beta")
    multiplier = hp.get("learning_rate_multiplier", "auto")
    if multiplier != "auto":
        if not (isinstance(multiplier, (int, float)) and multiplier > 0 and math.isfinite(multiplier)):
            raise InvalidRequest(f"{hp_param}.learning_rate_multiplier: must be a positive number or 'auto'",
                                 param=f"{hp_param}.learning_rate_multiplier")
        training["lr"] = BASE_LR * multiplier
    raw = {
        "model": base_model_of(ctx, org, req.model, job_id),
        "task": "preference" if dpo else "chat",
        "data": {"train": str(file_path(ctx, req.training_file))},
        "method": "lora",
        "training": training,
        "output_dir": str(ctx.settings.jobs_dir / job_id / "run"),
    }
    if dpo and hp.get("beta", "auto") != "auto":
        raw["preference"] = {"beta": hp["beta"]}
    if req.validation_file:
        raw["data"]["validation"] = str(file_path(ctx, req.validation_file))
    raw = _merge(raw, ext)
    if "eval" in ext:
        raw["eval"] = _eval_section(ctx, req, ext["eval"])
    try:
        spec = build_spec(raw, source="request")
    except SpecError as e:
        first = e.problems[0] if e.problems else None
        names = {"training.epochs": f"{hp_param}.n_epochs", "training.batch_size": f"{hp_param}.batch_size",
                 "training.lr": f"{hp_param}.learning_rate_multiplier"}
        param = None
        if first is not None:
            param = f"tuneforge.{first.field}" if first.field.split(".")[0] in ext else names.get(first.field, first.field)
        problems = "; ".join(f"{p.field}: {p.message}" for p in e.problems) or str(e)
        raise InvalidRequest(f"invalid job: {problems}", param=param, code="invalid_job_spec") from None
    if (spec.task == "preference") != dpo:
        want = "dpo" if spec.task == "preference" else "supervised"
        raise InvalidRequest(f"tuneforge.task: {spec.task!r} is trained by method.type {want!r}, not "
                             f"{method_type(req)!r}", param="tuneforge.task", code="invalid_job_spec")
    check_job_limits(ctx, spec, req.training_file)
    t = spec.training
    resolved = {"n_epochs": int(t.epochs) if float(t.epochs).is_integer() else t.epochs,
                "batch_size": t.batch_size, "learning_rate_multiplier": round(t.lr / BASE_LR, 6)}
    if dpo:
        resolved["beta"] = spec.preference_settings.beta
    return spec, resolved


def count_lines(path) -> int:
    """Lines in a file (an upper bound of its examples), read in blocks."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def check_job_limits(ctx: ServiceContext, spec, training_file: str) -> None:
    """What one job may use, as the operator set it (`tuneforge serve --max-job-ranks/--max-job-tokens`): over a
    limit is a 400 that names it."""
    s = ctx.settings
    ranks = spec.distributed.world_size if spec.distributed is not None else 1
    if ranks > s.max_job_ranks:
        raise InvalidRequest(
            f"tuneforge.distributed.nproc: this job would start {ranks} training processes; this server allows "
            f"{s.max_job_ranks} per job (its operator's --max-job-ranks)", param="tuneforge.distributed.nproc",
            code="job_limit_exceeded")
    t = spec.training
    per_step = t.batch_size * t.grad_accum * ranks
    if t.max_steps is not None:
        steps, how = t.max_steps, f"max_steps {t.max_steps}"
    else:
        examples = count_lines(spec.data.train)
        steps = math.ceil(t.epochs * math.ceil(examples / per_step))
        how = f"{t.epochs:g} epoch(s) of up to {examples} examples"
    sequences = 2 if spec.task == "preference" else 1  # a preference pair: both replies are trained on
    budget = steps * per_step * sequences * t.max_seq_len
    if budget > s.max_job_tokens:
        raise InvalidRequest(
            f"this job could train on up to {budget:,} tokens ({how}, {per_step * sequences} sequence(s) of up to "
            f"{t.max_seq_len} "
            f"tokens per step); this server allows {s.max_job_tokens:,} per job (its operator's --max-job-tokens): "
            "lower n_epochs, tuneforge.training.max_steps or max_seq_len, or train on a smaller file",
            param="hyperparameters.n_epochs" if t.max_steps is None else "tuneforge.training.max_steps",
            code="job_limit_exceeded")


def _check_file(ctx: ServiceContext, org: Org, file_id: str, param: str) -> None:
    row = ctx.store.get_file(org.id, file_id)
    if row is None:
        raise InvalidRequest(f"{param}: no such file {file_id} (upload it with purpose 'fine-tune')", param=param,
                             code="file_not_found")
    if row["purpose"] != "fine-tune":
        raise InvalidRequest(f"{param}: file {file_id} has purpose {row['purpose']!r}, not 'fine-tune'", param=param,
                             code="invalid_file_purpose")


def create(ctx: ServiceContext, org: Org, req: JobCreate, idempotency_key: str | None) -> tuple[int, dict]:
    body = json.dumps(req.model_dump(mode="json", exclude_unset=True), sort_keys=True)
    return idempotent(ctx.store, org.id, "POST /v1/fine_tuning/jobs", idempotency_key, payload_hash(body),
                      lambda: (200, _create(ctx, org, req)))


def _create(ctx: ServiceContext, org: Org, req: JobCreate) -> Job:
    job_id = new_id("ftjob")
    base_model_of(ctx, org, req.model, job_id)  # a base model or the org's own fine-tuned model, else a 400
    if req.integrations:
        raise InvalidRequest("integrations: not supported by this server (metrics are in the job's events and "
                             "result file)", param="integrations", code="unsupported_integration")
    _check_file(ctx, org, req.training_file, "training_file")
    if req.validation_file:
        _check_file(ctx, org, req.validation_file, "validation_file")
    if ctx.store.count_active_jobs(org.id) >= ctx.settings.max_active_jobs_per_org:
        raise TooManyRequests(f"this organization already has {ctx.settings.max_active_jobs_per_org} unfinished "
                              "fine-tuning jobs, the server's limit; wait for one to finish or cancel one",
                              code="too_many_jobs", headers={"Retry-After": "60"})
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    spec, resolved = build_job_spec(ctx, req, job_id, seed, org)
    kind = method_type(req)
    method = {"type": kind, kind: {"hyperparameters": resolved}}
    row = {"id": job_id, "org_id": org.id, "status": "validating_files", "model": req.model, "fine_tuned_model": None,
           "training_file": req.training_file, "validation_file": req.validation_file, "suffix": req.suffix,
           "seed": seed, "metadata": req.metadata, "hyperparameters": resolved, "method": method,
           "spec": spec.model_dump(mode="json"), "error": None, "created_at": now(), "started_at": None,
           "finished_at": None, "trained_tokens": None, "estimated_finish": None, "result_files": [],
           "requested": None, "worker_id": None, "heartbeat_at": None, "attempts": 0, "step": 0, "total_steps": None}
    ctx.store.insert_job(row)
    add_event(ctx, job_id, f"Validating training file: {req.training_file}"
              + (f" and validation file: {req.validation_file}" if req.validation_file else ""), dedup="validating")
    validate_files(ctx, job_id)
    return job_object(ctx.store.get_job(job_id))


def validate_files(ctx: ServiceContext, job_id: str) -> str:
    """validating_files -> queued, or failed with OpenAI's error codes and the engine's line-numbered problems."""
    from tuneforge.data.validate import validate_jsonl
    from tuneforge.spec import JobSpec

    job = ctx.store.get_job(job_id)
    spec = JobSpec.model_validate(job["spec"])
    error = None
    for param, path in (("training_file", spec.data.train), ("validation_file", spec.data.validation)):
        if path is None:
            continue
        file_id = job[param]
        report = validate_jsonl(path, spec.task, spec.labels)  # its messages name lines, not our paths
        if report.errors:
            shown = "; ".join(f"line {p.line}: {p.field}: {p.message}" if p.line else f"{p.field}: {p.message}"
                              for p in report.errors[:10])
            more = f" (and {len(report.errors) - 10} more)" if len(report.errors) > 10 else ""
            error = {"code": f"invalid_{param}", "param": param,
                     "message": f"{param} {file_id} has {len(report.errors)} problem(s) in {spec.task} format: "
                                f"{shown}{more}"}
            break
        if param == "training_file" and len(report.records) < MIN_EXAMPLES:
            error = {"code": "invalid_n_examples", "param": "training_file",
                     "message": f"training_file {file_id} has {len(report.records)} example(s); at least "
                                f"{MIN_EXAMPLES} are needed"}
            break
    if error:
        ctx.store.set_status(job_id, ("validating_files",), "failed", error=error, finished_at=now(),
                             event=event(job_id, error["message"], level="error", dedup="failed"))
        return "failed"
    ctx.store.set_status(job_id, ("validating_files",), "queued",
                         event=event(job_id, "Files validated, moving job to queued state", dedup="queued"))
    return "queued"


# ---------------------------------------------------------------- read and control


def get(ctx: ServiceContext, org: Org, job_id: str) -> Job:
    row = ctx.store.get_job(job_id, org.id)
    if row is None:
        raise NotFound("fine-tuning job", job_id, param="fine_tuning_job_id")
    return job_object(row)


def list_jobs(ctx: ServiceContext, org: Org, *, after: str | None, limit: int, metadata: dict[str, str]) -> JobList:
    rows, has_more = ctx.store.list_jobs(org.id, limit=limit, after=after, meta=metadata)
    if rows is None:
        raise InvalidRequest(f"after: no fine-tuning job {after} to list after", param="after")
    return JobList(data=[job_object(r) for r in rows], has_more=has_more)


def control(ctx: ServiceContext, org: Org, job_id: str, what: str) -> Job:
    """cancel / pause / resume. A queued job changes at once; a running one stops at its next step boundary
    with a checkpoint (within seconds) and its worker records the new status."""
    before = get(ctx, org, job_id)
    if what == "resume":
        resumed = ctx.store.resume_job(org.id, job_id, event(job_id, "Job resumed: queued to continue from its last "
                                                                      "checkpoint", dedup=f"resume:{secrets.token_hex(4)}"))
        if not resumed:
            raise InvalidRequest(f"job {job_id} is {before.status}; only a paused job can be resumed",
                                 param="fine_tuning_job_id", code="invalid_job_state")
        return get(ctx, org, job_id)
    if before.status in ("succeeded", "failed", "cancelled"):
        raise InvalidRequest(f"job {job_id} already {before.status}; it cannot be {JOB_STATES[what]}",
                             param="fine_tuning_job_id", code="invalid_job_state")
    if what == "pause" and before.status == "paused":
        return before
    ctx.store.request_stop(org.id, job_id, what, events={
        "cancelled": event(job_id, "Job cancelled", dedup="cancelled"),
        "paused": event(job_id, "Job paused", dedup=f"paused:{secrets.token_hex(4)}"),
        "running": event(job_id, f"{what.capitalize()} requested: stopping at the next step with a checkpoint",
                         dedup=f"{what}-requested:{secrets.token_hex(4)}")})
    return get(ctx, org, job_id)


def events(ctx: ServiceContext, org: Org, job_id: str, *, after: str | None, limit: int) -> EventList:
    get(ctx, org, job_id)
    rows, has_more = ctx.store.list_events(job_id, limit=limit, after=after)
    if rows is None:
        raise InvalidRequest(f"after: no event {after} in job {job_id}", param="after")
    return EventList(data=[event_object(r) for r in rows], has_more=has_more)


def checkpoints(ctx: ServiceContext, org: Org, job_id: str, *, after: str | None, limit: int) -> CheckpointList:
    get(ctx, org, job_id)
    rows, has_more = ctx.store.list_checkpoints(job_id, limit=limit, after=after)
    if rows is None:
        raise InvalidRequest(f"after: no checkpoint {after} in job {job_id}", param="after")
    data: list[Checkpoint] = [checkpoint_object(r) for r in rows]
    return CheckpointList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                          has_more=has_more)

