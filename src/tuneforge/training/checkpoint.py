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
                    scaler: torch.amp.GradScaler | None = None) -> Path:
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
    if final.exists():
        files.remove_owned(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        doomed = root / f".tmp-delete-{old.name}"
        os.rename(old, doomed)  # atomic: a crash mid-delete leaves a temporary, never a half `step-*`
        files.remove_owned(doomed)
    # What crashes left: temporaries (a cut-short save or delete), and folders without their state.json.
    for leftover in [*root.glob(".tmp-*"), *(p for p in root.glob("step-*") if not (p / STATE_FILE).is_file())]:
        files.remove_owned(leftover)
    return final


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
