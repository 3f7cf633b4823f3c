"""Fine-tuning jobs API shapes: requests as OpenAI accepts them (unknown fields refused, so mass-assignment
of `status`, `organization_id` or `trained_tokens` is a 400), answers as the openai SDK's `FineTuningJob`,
`FineTuningJobEvent` and `FineTuningJobCheckpoint` define them."""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
# OpenAI's bounds where it states them; ours where the engine needs one (every number a client sends is bounded).
MAX_EPOCHS, MAX_BATCH_SIZE, MAX_LR_MULTIPLIER, MAX_BETA = 50, 256, 10.0, 10.0
MAX_EVAL_NEW_TOKENS, MAX_EVAL_EXAMPLES = 256, 20
SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def auto_or_number(low: float, high: float, *, whole: bool, low_open: bool = False):
    """A hyperparameter that is "auto" or a number in [low, high] (`low_open`: (low, high]), checked before the
    union so that a bad value gets one message in OpenAI's terms, not one per branch of the type."""
    what = (f"a whole number from {low:g} to {high:g}" if whole else
            f"a number {'above' if low_open else 'of at least'} {low:g} and at most {high:g}")

    def check(value):
        if value is None or value == "auto":
            return value
        number_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if whole:
            number_ok = number_ok and float(value).is_integer()
        if not number_ok or not math.isfinite(value) or not (value > low if low_open else value >= low) or value > high:
            raise ValueError(f'must be {what}, or "auto"; got {value!r}')
        return int(value) if whole else float(value)

    if whole:
        kind = Annotated[int, Field(ge=int(low), le=int(high))]
    else:
        kind = Annotated[float, Field(gt=low, le=high) if low_open else Field(ge=low, le=high)]
    return Annotated[Literal["auto"] | kind | None, BeforeValidator(check)]


class HyperparametersIn(_Request):
    batch_size: auto_or_number(1, MAX_BATCH_SIZE, whole=True) = None
    learning_rate_multiplier: auto_or_number(0, MAX_LR_MULTIPLIER, whole=False, low_open=True) = Field(
        None, description="Multiplies the base learning rate (2e-4).")
    n_epochs: auto_or_number(1, MAX_EPOCHS, whole=True) = None


class SupervisedIn(_Request):
    hyperparameters: HyperparametersIn | None = None


class DpoHyperparametersIn(HyperparametersIn):
    beta: auto_or_number(0, MAX_BETA, whole=False, low_open=True) = Field(
        None, description="DPO's beta: how far the tuned model may move from the reference (auto: 0.1).")


class DpoIn(_Request):
    hyperparameters: DpoHyperparametersIn | None = None


class MethodIn(_Request):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedIn | None = None
    dpo: DpoIn | None = None
    reinforcement: dict[str, Any] | None = None


class JobEvalIn(_Request):
    """`tuneforge.eval` of a job request: the before/after report on the job's `validation_file` (the service sets
    the spec's `eval.data` to it). Checked by the jobs service, which names the field in its 400."""
    model_config = ConfigDict(extra="forbid", strict=True)  # as the schema says: 1 is not a boolean

    before_after: bool = Field(True, description="After training, evaluate the base and the fine-tuned model on the "
                               "validation_file and add report.json and report.md to the job's result_files.")
    max_new_tokens: int = Field(64, ge=1, le=MAX_EVAL_NEW_TOKENS,
                                description="Generation budget per held-out example.")
    examples: int = Field(5, ge=0, le=MAX_EVAL_EXAMPLES, description="Held-out examples shown side by side in "
                          "report.md (report.json holds every example's outputs).")


EXTENSION_SCHEMA = {"type": "object", "additionalProperties": True, "properties": {
    "eval": {**JobEvalIn.model_json_schema(), "description": "Before/after report on the job's validation_file "
             "(needs one); `data` is the service's."}}}


class JobCreate(_Request):
    model: str = Field(description="A base model this server offers (GET /v1/models).")
    training_file: str = Field(description="ID of an uploaded file with purpose fine-tune.")
    validation_file: str | None = None
    hyperparameters: HyperparametersIn | None = Field(None, description="Deprecated by OpenAI in favour of method.")
    method: MethodIn | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    suffix: str | None = Field(None, description="Up to 64 letters, digits, '-' or '_', added to the fine-tuned "
                               "model's name.")
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None
    tuneforge: Annotated[dict[str, Any], WithJsonSchema(EXTENSION_SCHEMA)] | None = Field(
        None, description="tuneforge extension: any part of the job spec, e.g. {\"method\": \"qlora\", "
        "\"adapter\": {\"r\": 8}, \"training\": {\"max_steps\": 20}} (validated by the same JobSpec as the CLI). "
        "{\"eval\": {\"before_after\": true}} with a validation_file: a before/after report among the result_files.")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 keys")
        for key, value in v.items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError("keys are at most 64 characters and values at most 512")
        return v

    @field_validator("suffix", mode="before")
    @classmethod
    def _suffix(cls, v):
        if v is not None and not (isinstance(v, str) and SUFFIX.fullmatch(v)):
            shown = repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "..."
            raise ValueError(f"use 1 to 64 letters, digits, '-' or '_' (it becomes part of the model's name); got {shown}")
        return v

    @field_validator("tuneforge")
    @classmethod
    def _finite(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # Python's JSON parser takes NaN and Infinity, which JSON does not have; a spec holding one could
        # be neither stored (PostgreSQL's json type refuses it) nor answered (JSON responses refuse it).
        def walk(value, path: str) -> None:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{path}: {value} is not a JSON number; use a finite number")
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
            for key, item in items:
                walk(item, f"{path}.{key}")
        walk(v, "tuneforge")
        return v


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Hyperparameters(BaseModel):
    batch_size: Literal["auto"] | int | None = None
    learning_rate_multiplier: Literal["auto"] | float | None = None
    n_epochs: Literal["auto"] | int | None = None


class Supervised(BaseModel):
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Literal["auto"] | float | None = None


class Dpo(BaseModel):
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: Dpo | None = None


class Job(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: Hyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: Method | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool


class Event(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] | None = None
    data: dict[str, Any] | None = None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Event]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Checkpoint]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


def job_object(row: dict) -> Job:
    hp = Hyperparameters(**{k: v for k, v in row["hyperparameters"].items() if k in Hyperparameters.model_fields})
    kind = row["method"].get("type", "supervised")
    method = (Method(type="dpo", dpo=Dpo(hyperparameters=DpoHyperparameters(**row["hyperparameters"])))
              if kind == "dpo" else Method(type=kind, supervised=Supervised(hyperparameters=hp)))
    return Job(id=row["id"], created_at=row["created_at"], error=JobError(**row["error"]) if row["error"] else None,
               fine_tuned_model=row["fine_tuned_model"], finished_at=row["finished_at"], hyperparameters=hp,
               model=row["model"], organization_id=row["org_id"], result_files=row["result_files"] or [],
               seed=row["seed"], status=row["status"], trained_tokens=row["trained_tokens"],
               training_file=row["training_file"], validation_file=row["validation_file"],
               estimated_finish=row["estimated_finish"] if row["status"] == "running" else None,
               integrations=[], metadata=row["metadata"], method=method)


def event_object(row: dict) -> Event:
    return Event(id=row["id"], created_at=row["created_at"], level=row["level"], message=row["message"],
                 type=row["type"], data=row["data"])


def checkpoint_object(row: dict) -> Checkpoint:
    return Checkpoint(id=row["id"], created_at=row["created_at"], fine_tuned_model_checkpoint=row["model_name"],
                      fine_tuning_job_id=row["job_id"], metrics=CheckpointMetrics(**row["metrics"]),
                      step_number=row["step"])
