"""Resumable checkpoints, written atomically and read defensively.

A checkpoint is a folder `checkpoints/step-000050/` holding the trainable weights (safetensors),
optimizer, scheduler, gradient-scaler and RNG states, and `state.json` (data position, the
learning-rate schedule's horizon). It is written under a temporary name and renamed only when
complete, so a crash mid-write never leaves a checkpoint that resume would pick up; a failed write
(a full disk) removes its temporary and keeps the previous checkpoint.

Reading loads every file of a checkpoint before touching the model, so a damaged checkpoint (a
truncated file) is reported by name and resume falls back to the previous complete one.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneforge import files
from tuneforge.errors import CheckpointError, OutputError

STATE_FILE = "state.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


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
                    scaler: torch.amp.GradScaler | None = None, strategy=None) -> Path:
    """Write `checkpoints/step-N/` (called by every rank when `strategy` spans several: see
    `_save_distributed`)."""
    if strategy is not None and strategy.world_size > 1:
        return _save_distributed(run_dir, step, model, optimizer, scheduler, state, keep, scaler, strategy)
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    previous = latest_checkpoint(run_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            files.remove_owned(tmp)
        tmp.mkdir()
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if scaler is not None and scaler.is_enabled():
            torch.save(scaler.state_dict(), tmp / "grad_scaler.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except (OSError, RuntimeError) as e:
        files.remove_temporary(tmp)
        err = files.disk_error(e, tmp)
        kept = f"; kept {previous.name}" if previous else "; no earlier checkpoint exists"
        raise OutputError(f"checkpoint step {step} not written: {err}{kept}") from None
    _publish(run_dir, root, tmp, final, keep)
    return final


def _publish(run_dir: Path, root: Path, tmp: Path, final: Path, keep: int) -> None:
    """Rename a complete temporary checkpoint into place, then drop the oldest beyond `keep`."""
    if final.exists():
        files.remove_owned(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        doomed = root / f".tmp-delete-{old.name}"
        os.rename(old, doomed)  # atomic: a crash mid-delete leaves a temporary, never a half `step-*`
        files.remove_owned(doomed)
    sweep_leftovers(run_dir)


def sweep_leftovers(run_dir: Path) -> None:
    """Remove what crashes left in a run's checkpoints: temporaries (a cut-short save or prune) and `step-*`
    folders without their state.json. Only the main rank (or one process) may call this."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for leftover in [*root.glob(".tmp-*"), *(p for p in root.glob("step-*") if not (p / STATE_FILE).is_file())]:
        files.remove_owned(leftover)


def _rank_rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank:05d}.pt"


def _save_distributed(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int, scaler,
                      strategy) -> Path:
    """Every rank writes its part into the main rank's temporary folder (a filesystem all nodes share):
    weights and optimizer state (the strategy's format: the main rank's files for replicated weights, plus
    each rank's own optimizer shard for zero1; torch.distributed.checkpoint or DeepSpeed shards for sharded
    ones) and its own RNG state; the main rank adds
    scheduler, scaler and state.json, then renames the folder once every rank has reported success."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    previous = latest_checkpoint(run_dir)
    problem = None
    if strategy.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                files.remove_owned(tmp)
            tmp.mkdir()
        except OSError as e:
            problem = files.disk_error(e, tmp)
    if strategy.all_reduce_max(problem is not None):  # every rank learns that the folder is not there
        problem = problem or "the main rank could not create the checkpoint folder"
    else:
        try:
            strategy.save_model_and_optimizer(tmp, model, optimizer)  # collective
            torch.save(rng_state(), tmp / _rank_rng_file(strategy.rank))
            if strategy.is_main:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                if scaler is not None and scaler.is_enabled():
                    torch.save(scaler.state_dict(), tmp / "grad_scaler.pt")
        except (OSError, RuntimeError) as e:
            problem = files.disk_error(e, tmp) if isinstance(e, OSError) else str(e)[:200]
        if strategy.all_reduce_max(problem is not None) and problem is None:
            problem = "another rank failed to write its part"
    if problem is None and strategy.is_main:
        try:
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "world_size": strategy.world_size,
                                                      "strategy": strategy.name}, indent=1))
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        except OSError as e:
            problem = files.disk_error(e, tmp)
    if strategy.all_reduce_max(problem is not None) and problem is None:
        problem = "the main rank failed to finish the checkpoint"
    if problem is not None:
        if strategy.is_main:
            files.remove_temporary(tmp)
        kept = f"; kept {previous.name}" if previous else "; no earlier checkpoint exists"
        raise OutputError(f"checkpoint step {step} not written: {problem}{kept}")
    if strategy.is_main:
        _publish(run_dir, root, tmp, final, keep)
    strategy.barrier()  # no rank moves on (or reads list_checkpoints) before the rename
    return final


def load_distributed(run_dir: Path, model, optimizer, scheduler, scaler, strategy) -> tuple[Path | None, dict, list[str]]:
    """Every rank restores the newest checkpoint all ranks can read (weights and optimizer through the
    strategy, its own RNG state); returns (path or None, state.json, a message per damaged one skipped)."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = None
        try:
            saved = read_state(path)
            if saved.get("world_size", 1) != strategy.world_size:
                raise CheckpointError(f"{path} was written by {saved.get('world_size', 1)} rank(s), this run has "
                                      f"{strategy.world_size}; resume with the same number of processes")
            small = {name: torch.load(path / name, weights_only=True)
                     for name in ("scheduler.pt", _rank_rng_file(strategy.rank), "grad_scaler.pt")
                     if name != "grad_scaler.pt" or (path / name).exists()}
        except CheckpointError as e:
            problem = str(e)
        except Exception as e:  # a truncated or missing file
            problem = f"{path} is damaged ({type(e).__name__}: {str(e)[:200]})"
        if not strategy.all_reduce_max(problem is not None):
            try:
                strategy.load_model_and_optimizer(path, model, optimizer)  # collective
            except (CheckpointError, KeyError, ValueError, RuntimeError) as e:
                problem = str(e)[:300]
            if not strategy.all_reduce_max(problem is not None):
                scheduler.load_state_dict(small["scheduler.pt"])
                if scaler is not None and scaler.is_enabled() and "grad_scaler.pt" in small:
                    scaler.load_state_dict(small["grad_scaler.pt"])
                set_rng_state(small[_rank_rng_file(strategy.rank)])
                return path, saved, skipped
        skipped.append(problem or f"{path}: another rank could not read it")
    return None, {}, skipped


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(path: Path) -> dict:
    """A checkpoint's `state.json` (step, data position, schedule horizon), without loading tensors."""
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / STATE_FILE} is unreadable: {e}") from None


@dataclass
class Checkpoint:
    """Everything in a checkpoint folder, loaded into memory (nothing applied yet)."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict
    scaler: dict | None
    state: dict


def read_checkpoint(path: Path) -> Checkpoint:
    """Load every file of a checkpoint; CheckpointError names the first file that cannot be read."""

    def attempt(name: str, load):
        try:
            return load(path / name)
        except FileNotFoundError:
            raise CheckpointError(f"{path / name} is missing") from None
        except Exception as e:  # safetensors' SafetensorError, torch's unpickling and zip errors, OSError
            raise CheckpointError(f"{path / name} is damaged ({type(e).__name__}: {str(e)[:200]})") from None

    def torch_load(p: Path):
        return torch.load(p, weights_only=True)

    scaler = attempt("grad_scaler.pt", torch_load) if (path / "grad_scaler.pt").exists() else None
    return Checkpoint(path, attempt("trainable.safetensors", load_file), attempt("optimizer.pt", torch_load),
                      attempt("scheduler.pt", torch_load), attempt("rng.pt", torch_load), scaler, read_state(path))


def apply_checkpoint(ckpt: Checkpoint, model, optimizer, scheduler, scaler: torch.amp.GradScaler | None = None) -> dict:
    """Restore weights, optimizer, scheduler, gradient scaler and RNG; return the saved state dict."""
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(ckpt.weights) != expected:
        missing = sorted(expected - set(ckpt.weights))[:3]
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not match this model/method (e.g. missing {missing}); "
            "resume with the same spec, or start a new output_dir"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in ckpt.weights.items():
            params[n].copy_(t)
    try:
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {ckpt.path} does not match this optimizer/schedule: {e}") from None
    if scaler is not None and scaler.is_enabled() and ckpt.scaler is not None:
        scaler.load_state_dict(ckpt.scaler)
    set_rng_state(ckpt.rng)
    return ckpt.state


def newest_readable(run_dir: Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint whose files all load, and a message for each damaged one skipped."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return read_checkpoint(path), skipped
        except CheckpointError as e:
            skipped.append(str(e))
    return None, skipped
