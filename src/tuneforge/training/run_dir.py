"""A run folder's layout, known here and nowhere else.

    RUN/
      .tuneforge-run            marker: tuneforge made this folder (files.py's delete guard reads it)
      spec.yaml                 the resolved job spec the run was started with
      metrics.jsonl             one object per logged step (METRICS below), tensorboard/ beside it
      reference_logps.safetensors  task preference with a precomputed reference: its log-probs per pair
      checkpoints/step-000050/  a resumable checkpoint (CheckpointDir), written under .tmp-step-* and renamed
      adapter/ | model/         the trained adapter (peft format) or, for full fine-tuning, the model
      summary.json              the RunSummary of a finished run
      loss_curve.png, report.md, report.json, before_after.png

Every layer that reads or writes a run (the recipe, checkpoints, the strategies, inference, serving, the
service, export) asks a `RunDir` or a `CheckpointDir` for its paths; the strategies below the training layer
get a `CheckpointDir` passed in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tuneforge import files

# What a run writes into its folder: `files.remove_run_outputs` deletes these and nothing else.
OUTPUTS = ("checkpoints", "adapter", "model", ".tmp-adapter", ".tmp-model", "tensorboard", "summary.json",
           "metrics.jsonl", "spec.yaml", "loss_curve.png", "report.md", "report.json", "before_after.png",
           "demo_report.json", "result.csv", "reference_logps.safetensors", ".tmp-reference_logps.safetensors")
# The metrics a step logs (metrics.jsonl, `step` events): losses and token accuracies of training and validation.
TRAIN_LOSS, TRAIN_ACCURACY, EVAL_LOSS, EVAL_ACCURACY = ("train_loss", "train_token_accuracy", "eval_loss",
                                                        "eval_token_accuracy")
# Task preference (training/preference.py): the share of pairs whose preferred reply gets the higher reward, the
# mean reward margin, the mean summed log-probs of either reply; validation's accuracy and margin.
REWARD_ACCURACY, REWARD_MARGIN, LOGPS_CHOSEN, LOGPS_REJECTED = ("reward_accuracy", "reward_margin", "logps_chosen",
                                                                "logps_rejected")
EVAL_REWARD_ACCURACY, EVAL_REWARD_MARGIN = "eval_reward_accuracy", "eval_reward_margin"
PREFERENCE_METRICS = (REWARD_ACCURACY, REWARD_MARGIN, LOGPS_CHOSEN, LOGPS_REJECTED, EVAL_REWARD_ACCURACY,
                      EVAL_REWARD_MARGIN)
METRICS = (TRAIN_LOSS, TRAIN_ACCURACY, EVAL_LOSS, EVAL_ACCURACY, "lr", "grad_norm", "epoch", "tokens_per_second",
           *PREFERENCE_METRICS)
STEP_PREFIX = "step-"


@dataclass(frozen=True)
class CheckpointDir:
    """The files of one checkpoint folder. Which of them a checkpoint holds depends on who wrote it: one process
    writes weights + optimizer; replicated ranks (ddp) the same from the main rank; zero1 each rank's optimizer
    shard; FSDP2 `sharded/` (torch.distributed.checkpoint), DeepSpeed `deepspeed/`."""

    path: Path

    @property
    def step(self) -> int:
        return int(self.path.name.removeprefix(STEP_PREFIX))

    @property
    def weights(self) -> Path:  # the trainable weights (safetensors): what serving a checkpoint loads
        return self.path / "trainable.safetensors"

    @property
    def optimizer(self) -> Path:
        return self.path / "optimizer.pt"

    def optimizer_shard(self, rank: int) -> Path:
        return self.path / f"optimizer-rank{rank:05d}.pt"

    @property
    def scheduler(self) -> Path:
        return self.path / "scheduler.pt"

    @property
    def scaler(self) -> Path:
        return self.path / "grad_scaler.pt"

    def rng(self, rank: int = 0) -> Path:
        return self.path / ("rng.pt" if rank == 0 else f"rng-rank{rank:05d}.pt")

    @property
    def state(self) -> Path:  # step, data position, the schedule's horizon; its presence marks a complete checkpoint
        return self.path / "state.json"

    @property
    def sharded(self) -> Path:
        return self.path / "sharded"

    @property
    def deepspeed(self) -> Path:
        return self.path / "deepspeed"

    @property
    def complete(self) -> bool:
        return self.state.is_file()


class RunDir:
    """One run folder (it need not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- files
    @property
    def spec(self) -> Path:
        return self.path / "spec.yaml"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def reference_logps(self) -> Path:
        """Task preference, precomputed reference: (chosen, rejected) log-probs of every train/validation pair."""
        return self.path / "reference_logps.safetensors"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def loss_curve(self) -> Path:
        return self.path / "loss_curve.png"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def report_json(self) -> Path:
        return self.path / "report.json"

    @property
    def before_after(self) -> Path:
        return self.path / "before_after.png"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def model(self) -> Path:
        return self.path / "model"

    def output(self, method: str) -> Path:
        """Where the trained result goes: model/ for full fine-tuning, adapter/ for every adapter method."""
        return self.model if method == "full" else self.adapter

    @property
    def checkpoints_root(self) -> Path:
        return self.path / "checkpoints"

    # ---- what it is
    @property
    def is_ours(self) -> bool:
        return files.owner_of(self.path) == "run"

    @property
    def is_run(self) -> bool:
        """A tuneforge run folder: it holds the spec the run was started with."""
        return self.path.is_dir() and self.spec.is_file()

    @property
    def is_finished(self) -> bool:
        """A run that wrote its adapter or model."""
        return self.is_run and (self.adapter.is_dir() or self.model.is_dir())

    # ---- checkpoints
    def checkpoint(self, step: int) -> CheckpointDir:
        return CheckpointDir(self.checkpoints_root / f"{STEP_PREFIX}{step:06d}")

    def temporary_checkpoint(self, step: int) -> Path:
        return self.checkpoints_root / f".tmp-{STEP_PREFIX}{step:06d}"

    def checkpoints(self) -> list[CheckpointDir]:
        """Complete checkpoints, oldest first (temporaries and folders without their state file are never listed)."""
        if not self.checkpoints_root.is_dir():
            return []
        found = [CheckpointDir(p) for p in self.checkpoints_root.glob(f"{STEP_PREFIX}*")
                 if p.name.removeprefix(STEP_PREFIX).isdigit()]
        return sorted((c for c in found if c.complete), key=lambda c: c.step)

    def latest_checkpoint(self) -> CheckpointDir | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def checkpoint_at(self, step: int) -> CheckpointDir | None:
        """The complete checkpoint of `step`, if it is still on disk."""
        return next((c for c in self.checkpoints() if c.step == step), None)

    def leftovers(self) -> list[Path]:
        """What crashes leave among the checkpoints: temporaries and `step-*` folders without their state file."""
        if not self.checkpoints_root.is_dir():
            return []
        return [*self.checkpoints_root.glob(".tmp-*"),
                *(p for p in self.checkpoints_root.glob(f"{STEP_PREFIX}*") if not CheckpointDir(p).complete)]

    # ---- reading
    def read_spec(self, overrides: list[str] | tuple[str, ...] = ()):
        from tuneforge.spec import load_spec

        return load_spec(self.spec, overrides)

    def read_summary(self) -> dict | None:
        """summary.json as a dict, or None when there is none or it is unreadable."""
        try:
            data = json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl's rows (a torn last line, what a kill mid-write leaves, is skipped)."""
        try:
            return parse_metrics(self.metrics.read_text(encoding="utf-8", errors="replace"))[0]
        except OSError:
            return []


def parse_metrics(text: str) -> tuple[list[dict], int]:
    """metrics.jsonl's text as (rows, number of unreadable lines): a crash mid-write can leave a torn last line."""
    rows, torn = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            torn += 1
    return rows, torn
