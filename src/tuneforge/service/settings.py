"""The service's settings: one pydantic model shared by `tuneforge serve`, the API process and the workers
(passed to child processes as JSON in TUNEFORGE_SERVICE_SETTINGS)."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneforge.errors import SpecError

ENV_VAR = "TUNEFORGE_SERVICE_SETTINGS"
DEFAULT_BASE_MODELS = {"smollm2-135m-instruct": "smollm2-135m-instruct"}


class ServiceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(description="Uploaded files, job run folders, the SQLite database and the key pepper.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///DATA_DIR/tuneforge.db. "
                                     "postgresql://user:pass@host/db uses PostgreSQL (psycopg 3).")
    base_models: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_BASE_MODELS),
                                        description="Model name users may fine-tune -> alias, local folder or .gguf.")
    max_upload_bytes: int = Field(512 * 2**20, ge=1, description="Largest upload; enforced while streaming (413).")
    max_active_jobs_per_org: int = Field(4, ge=1, description="Jobs not yet finished per org; beyond it 429.")
    heartbeat_seconds: float = Field(10.0, gt=0, description="How often a worker marks its running job alive.")
    reclaim_after_seconds: float = Field(30.0, gt=0, description="A running job whose worker is silent this long "
                                         "is requeued and resumed from its last checkpoint.")
    poll_seconds: float = Field(1.0, gt=0, description="How often an idle worker looks for work, and a busy one "
                                "for cancel/pause requests.")
    max_attempts: int = Field(10, ge=1, description="Training attempts per job that end without progress before "
                              "the job fails (an attempt that wrote a new checkpoint does not count).")
    training_threads: int | None = Field(None, ge=1, description="torch threads per training subprocess "
                                         "(default: torch's own choice).")
    fork_attempts: bool = Field(True, description="Each worker imports the training stack (torch, transformers, "
                                "peft) once, when the first job is queued, and forks every training attempt from "
                                "it (seconds sooner to its first step, and that CPU saved; the worker then holds "
                                "~500 MB of imported modules, shared with its forks); false: each attempt is a "
                                "fresh `python -m tuneforge.service.runner`.")
    adapters: dict[str, str] = Field(default_factory=dict, description="Served model name -> run folder (or merged "
                                     "model folder) trained with the CLI; every org's key may use them.")
    max_batch: int = Field(16, ge=1, description="Sequences decoded together per loaded model.")
    max_waiting: int = Field(64, ge=1, description="Requests waiting per loaded model; beyond it 429.")
    max_adapters: int = Field(8, ge=1, description="LoRA adapters loaded per base model (LRU beyond).")
    max_adapter_bytes: int = Field(2 * 2**30, ge=1, description="Bytes of LoRA adapters loaded per base model.")
    inference_threads: int | None = Field(None, ge=1, description="torch threads of the API process (inference).")
    prefix_cache_bytes: int = Field(512 * 2**20, ge=0, description="Bytes of prompt-prefix KV cache kept per loaded "
                                    "PyTorch model (automatic prefix caching, LRU beyond; 0: off).")
    inference_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Weights of served models: fp32 (what `tuneforge generate` computes, token for token) "
        "or bf16 (faster, most on CPUs with AVX512-BF16/AMX; greedy output may differ at near-ties).")
    default_save_every: int = Field(10, ge=1, description="training.save_every for service jobs that do not set "
                                    "it: how many steps a crash, cancel or pause can cost at most.")
    shutdown_grace_seconds: float = Field(25.0, gt=0, le=3600, description="On SIGTERM/SIGINT: how long running "
                                          "trainings have to reach a step boundary and checkpoint before they are "
                                          "stopped at once (keep it below the orchestrator's kill timeout).")
    # What one job may use (the operator's bounds; a request over one is a 400 naming it).
    max_job_ranks: int = Field(1, ge=1, le=1024, description="Training processes one job may start "
                               "(tuneforge.distributed.nproc); 1 refuses distributed jobs.")
    max_job_tokens: int = Field(100_000_000, ge=1, description="Token budget of one job: optimizer steps x "
                                "batch_size x grad_accum x ranks x max_seq_len, the most it can train on.")
    max_running_jobs_per_org: int | None = Field(None, ge=1, description="Jobs of one org training at once "
                                                 "(default: as many as there are free workers). Whatever it is, "
                                                 "a free worker takes the next job of the org with the fewest "
                                                 "running.")

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'tuneforge.db').absolute()}"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    def pepper(self) -> bytes:
        """The server-side secret mixed into every API-key hash: TUNEFORGE_PEPPER, else DATA_DIR/pepper
        (made on first use, readable by its owner only)."""
        if os.environ.get("TUNEFORGE_PEPPER"):
            return os.environ["TUNEFORGE_PEPPER"].encode()
        path = self.data_dir / "pepper"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return path.read_text().strip().encode()

    def to_env(self) -> dict[str, str]:
        return {ENV_VAR: self.model_dump_json()}

    @classmethod
    def from_env(cls) -> ServiceSettings:
        raw = os.environ.get(ENV_VAR)
        if not raw:
            raise SpecError(f"{ENV_VAR} is not set: start the service with `tuneforge serve`")
        return cls.model_validate(json.loads(raw))


def parse_adapters(items: list[str]) -> dict[str, str]:
    """`--adapter NAME=FOLDER` (repeatable) -> {NAME: FOLDER}. Each folder is checked here, so that one that is not
    a servable model (a finished run, a merged model, a peft adapter folder or an ONNX export) stops the start with
    one line instead of being listed to every org and failing each request."""
    from tuneforge.errors import TuneforgeError
    from tuneforge.serving.exports import check_export, is_export
    from tuneforge.serving.registry import run_target

    out = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise SpecError(f"--adapter {item!r}: expected NAME=FOLDER (a finished run, a merged model, a peft "
                            "adapter folder or an ONNX export)")
        if not Path(folder.strip()).is_dir():
            raise SpecError(f"--adapter {item!r}: {folder.strip()} is not a folder")
        if is_export(Path(folder.strip())):
            try:
                record = check_export(Path(folder.strip()))
            except TuneforgeError as e:
                raise SpecError(f"--adapter {item!r}: {e}") from None
            if record["format"] == "onnx-adapters" and ":" in name:
                raise SpecError(f"--adapter {item!r}: NAME may not hold ':' (an adapters export serves NAME:ADAPTER)")
        else:
            try:
                run_target(Path(folder.strip()), name.strip())
            except TuneforgeError as e:
                raise SpecError(f"--adapter {item!r}: {e}") from None
        out[name.strip()] = str(Path(folder.strip()).resolve())
    return out


def parse_base_models(items: list[str]) -> dict[str, str]:
    """`--base-model NAME=SOURCE` (repeatable) -> {NAME: SOURCE}; none given: SmolLM2-135M-Instruct."""
    if not items:
        return dict(DEFAULT_BASE_MODELS)
    out = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise SpecError(f"--base-model {item!r}: expected NAME=SOURCE (an alias, a model folder or a .gguf file)")
        out[name.strip()] = source.strip()
    return out
