"""Resumable checkpoints, written atomically and read defensively, by one process or by every rank of several.

A checkpoint is a folder `checkpoints/step-000050/` (its files: run_dir.CheckpointDir) holding the trainable
weights and the optimizer's state (in the strategy's format: one process's files, each zero1 rank's optimizer
shard, FSDP2's or DeepSpeed's shards), the scheduler, gradient-scaler and every rank's RNG state, and
`state.json` (data position, the learning-rate schedule's horizon, the world size). It is written under a
temporary name and renamed only when complete, so a crash mid-write never leaves a checkpoint that resume would
pick up; a failed write (a full disk) removes its temporary and keeps the previous checkpoint.

Reading loads a checkpoint's files before applying them, so a damaged checkpoint (a truncated file) is reported
by name and resume falls back to the previous complete one. One process is a world of one (SingleDevice): the
same code writes and reads its checkpoints, with collectives that are the identity.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from tuneforge import files
from tuneforge.distributed import SingleDevice, Strategy
from tuneforge.distributed.strategy import read_checkpoint_file
from tuneforge.errors import CheckpointError, OutputError
from tuneforge.training.run_dir import CheckpointDir, RunDir


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int = 2,
                    scaler: torch.amp.GradScaler | None = None, strategy: Strategy | None = None) -> Path:
    """Write `checkpoints/step-N/` and return its path; with several ranks, every rank calls this.

    Every rank writes its part into the main rank's temporary folder (a filesystem all nodes share): weights and
    optimizer state through the strategy, and its own RNG state; the main rank adds scheduler, scaler and the
    state file, then renames the folder once every rank has reported success. Oldest checkpoints beyond `keep`
    are removed."""
    strategy = strategy or SingleDevice(torch.device("cpu"))
    run = RunDir(run_dir)
    root, final, tmp = run.checkpoints_root, run.checkpoint(step).path, run.temporary_checkpoint(step)
    files_of = CheckpointDir(tmp)
    previous = run.latest_checkpoint()
    problem = None
    if strategy.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                files.remove_owned(tmp)
            tmp.mkdir()
        except OSError as e:
            problem = str(files.disk_error(e, tmp))
    if strategy.all_reduce_max(problem is not None):  # every rank learns that the folder is not there
        problem = problem or "the main rank could not create the checkpoint folder"
    else:
        try:
            strategy.save_model_and_optimizer(files_of, model, optimizer)  # collective
            torch.save(rng_state(), files_of.rng(strategy.rank))
            if strategy.is_main:
                torch.save(scheduler.state_dict(), files_of.scheduler)
                if scaler is not None and scaler.is_enabled():
                    torch.save(scaler.state_dict(), files_of.scaler)
        except (OSError, RuntimeError) as e:  # a full disk: OSError, or torch.save's zip writer's RuntimeError
            problem = str(files.disk_error(e, tmp))
        if strategy.all_reduce_max(problem is not None) and problem is None:
            problem = "another rank failed to write its part"
    if problem is None and strategy.is_main:
        try:
            files_of.state.write_text(json.dumps({**state, "step": step, "world_size": strategy.world_size,
                                                  "strategy": strategy.name}, indent=1))
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        except OSError as e:
            problem = str(files.disk_error(e, tmp))
    if strategy.all_reduce_max(problem is not None) and problem is None:
        problem = "the main rank failed to finish the checkpoint"
    if problem is not None:
        if strategy.is_main:
            files.remove_temporary(tmp)
        kept = f"; kept {previous.path.name}" if previous else "; no earlier checkpoint exists"
        raise OutputError(f"checkpoint step {step} not written: {problem}{kept}")
    if strategy.is_main:
        _publish(run, tmp, final, keep)
    strategy.barrier()  # no rank moves on (or lists the checkpoints) before the rename
    return final


def _publish(run: RunDir, tmp: Path, final: Path, keep: int) -> None:
    """Rename a complete temporary checkpoint into place, then drop the oldest beyond `keep`."""
    if final.exists():
        files.remove_owned(final)
    os.rename(tmp, final)
    _fsync_dir(run.checkpoints_root)
    for old in run.checkpoints()[:-keep]:
        doomed = run.checkpoints_root / f".tmp-delete-{old.path.name}"
        os.rename(old.path, doomed)  # atomic: a crash mid-delete leaves a temporary, never a half `step-*`
        files.remove_owned(doomed)
    sweep_leftovers(run.path)


def sweep_leftovers(run_dir: Path) -> None:
    """Remove what crashes left in a run's checkpoints: temporaries (a cut-short save or prune) and `step-*`
    folders without their state file. Only the main rank (or one process) may call this."""
    for leftover in RunDir(run_dir).leftovers():
        files.remove_owned(leftover)


def load_newest(run_dir: Path, model, optimizer, scheduler, scaler, strategy: Strategy | None = None
                ) -> tuple[Path | None, dict, list[str]]:
    """Restore the newest checkpoint every rank can read (weights and optimizer through the strategy, this rank's
    RNG state); returns (its path or None, its state file, a message per damaged one skipped)."""
    strategy = strategy or SingleDevice(torch.device("cpu"))
    skipped = []
    for found in reversed(RunDir(run_dir).checkpoints()):
        problem = None
        try:
            saved = read_state(found)
            if saved.get("world_size", 1) != strategy.world_size:
                raise CheckpointError(f"{found.path} was written by {saved.get('world_size', 1)} rank(s), this run "
                                      f"has {strategy.world_size}; resume with the same number of processes")
            small = {what: read_checkpoint_file(file, lambda p: torch.load(p, weights_only=True))
                     for what, file in (("scheduler", found.scheduler), ("rng", found.rng(strategy.rank)),
                                        ("scaler", found.scaler))
                     if what != "scaler" or file.exists()}
        except CheckpointError as e:
            problem = str(e)
        if not strategy.all_reduce_max(problem is not None):
            try:
                strategy.load_model_and_optimizer(found, model, optimizer)  # collective
            except (CheckpointError, KeyError, ValueError, RuntimeError) as e:
                problem = str(e)[:300]
            if not strategy.all_reduce_max(problem is not None):
                try:
                    scheduler.load_state_dict(small["scheduler"])
                except (KeyError, ValueError) as e:
                    raise CheckpointError(f"checkpoint {found.path} does not match this schedule: {e}") from None
                if scaler is not None and scaler.is_enabled() and "scaler" in small:
                    scaler.load_state_dict(small["scaler"])
                set_rng_state(small["rng"])
                return found.path, saved, skipped
        skipped.append(problem or f"{found.path}: another rank could not read it")
    return None, {}, skipped


def read_state(checkpoint: CheckpointDir) -> dict:
    """A checkpoint's state file (step, data position, schedule horizon), without loading tensors."""
    try:
        return json.loads(checkpoint.state.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{checkpoint.state} is unreadable: {e}") from None
