"""Shapes of tuneforge's own endpoints beside OpenAI's (`/v1/tuneforge/...`). A plan request is a fine-tuning
job request (the same `JobCreate`), so that the verdict is about the very job the same body would create."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from tuneforge.service.jobs.protocol import JobCreate

PlanRequest = JobCreate


class DataProblem(BaseModel):
    param: Literal["training_file", "validation_file"] = Field(description="Which of the request's files.")
    file: str = Field(description="The file's ID.")
    line: int | None = Field(description="1-based line of the file, when the problem is on one.")
    field: str = Field(description="The field at fault, e.g. messages[1].content.")
    message: str


class Uncertainty(BaseModel):
    peak_memory: float = Field(description="Relative uncertainty of the predicted peak memory, e.g. 0.15 for ±15 %.")
    step_time: float = Field(description="Relative uncertainty of the predicted step (and run) time.")


class Verdict(BaseModel):
    device: str = Field(description="cpu or cuda: where the server's workers train.")
    memory_mb: float = Field(description="Memory of the server's machine (RAM, or the GPU's) in MiB.")
    fits: bool | None = Field(description="Whether the predicted peak leaves the planner's headroom (10 %); "
                              "null when it could not be predicted.")
    predicted_peak_mb: float | None
    peak_mb_low: float | None = Field(description="predicted_peak_mb less its uncertainty.")
    peak_mb_high: float | None = Field(description="predicted_peak_mb plus its uncertainty.")
    fits_at_high: bool | None = Field(description="Whether peak_mb_high still fits: false means close to the limit.")
    predicted_step_seconds: float | None = Field(description="One optimizer step.")
    predicted_run_seconds: float | None = Field(description="The whole run (total_steps steps), data loading aside.")
    total_steps: int | None
    micro_batch: dict[str, int] = Field(description="rows x seq_len of the largest micro-batch.")
    trainable_params: int
    total_params: int
    gradient_checkpointing: bool
    uncertainty: Uncertainty
    note: str = Field("", description="Why a figure is missing, when one is.")


class Plan(BaseModel):
    """The answer of POST /v1/tuneforge/plan: `status` running (202: send the same request again for the
    verdict) or done (200)."""

    object: Literal["tuneforge.plan"] = "tuneforge.plan"
    status: Literal["running", "done"]
    model: str = Field(description="The request's base model.")
    method: str = Field(description="The tuneforge method planned (tuneforge.method; lora unless set).")
    progress: str = Field(description="What the planner is doing, e.g. probing lora (4 x 128 tokens).")
    elapsed_seconds: float = Field(description="Since this request shape was first asked for.")
    cached: bool = Field(description="The verdict was already known when this request came.")
    data_problems: list[DataProblem] | None = Field(
        description="What the engine's validator finds in the files (a job on them would fail), null while they "
                    "are being checked. The plan is skipped when there are any.")
    verdict: Verdict | None = Field(description="Set once status is done and the files have no problems.")


class JobSpecAnswer(BaseModel):
    """The tuneforge JobSpec a fine-tuning job runs, as resolved from its request: the server's paths replaced
    by the names the client knows (the base model's name, the files' IDs)."""

    object: Literal["tuneforge.job_spec"] = "tuneforge.job_spec"
    fine_tuning_job_id: str
    spec: dict[str, Any]
