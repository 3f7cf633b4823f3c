"""The interface between the training loop and data parallelism.

The loop calls only these methods, so a torch.distributed strategy (DDP, ZeRO-1, FSDP2, DeepSpeed
ZeRO; torch_strategies.py, deepspeed.py) replaces `SingleDevice` without the loop knowing which.

The loop's forward is a module (`ForwardLoss`: batch -> (loss sum, correct)) so that a wrapper
(DDP, FSDP2's root, a DeepSpeed engine) sees every forward and can hook its communication in.

Gradient scale, written down once: every rank divides its summed loss by the target count of the
*whole* global batch (all-reduced), so the sum of the ranks' gradients is the 1-process gradient.
DDP, FSDP2 and DeepSpeed *average* gradients over ranks (divide by world size); `grad_scale` = world
size multiplies the loss to undo that average (for 2, 4, 8 ranks both are exact powers of two).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Protocol

import torch
from safetensors.torch import load_file, save_file

from tuneforge.errors import CheckpointError, TuneforgeError


class DistributedError(TuneforgeError):
    """A rank died, hung or could not join the process group; the message names the rank."""

    kind = "distributed"
    exit_code = 1


class ForwardLoss(torch.nn.Module):
    """`model` plus its loss function as one module: forward(batch) -> (loss sum, correct count)."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.loss_fn(batch)


class Strategy(Protocol):
    world_size: int
    rank: int
    device: torch.device
    name: str  # "single", "ddp", "zero1", "zero2", "zero3", "deepspeed-zero2", ...
    sharded: bool  # checkpoints are written by every rank (each holds a part of the state)
    grad_scale: float  # multiplies the loss before backward (undoes the wrapper's averaging)

    @property
    def is_main(self) -> bool: ...
    def wrap(self, module: ForwardLoss) -> torch.nn.Module: ...
    def build_optimizer(self, params: list, make: Callable, lr: float, weight_decay: float): ...
    def accumulate(self, wrapped: torch.nn.Module, is_last: bool): ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def clip_grad_norm(self, params: list, max_norm: float) -> float | None: ...  # None: clipped in the step
    def step_grad_norm(self) -> float | None: ...  # the norm an engine clipped inside its step
    def all_reduce_sum(self, value: float) -> float: ...
    def all_reduce_max(self, value: float) -> float: ...
    def gather_floats(self, value: float) -> list[float]: ...  # every rank's value, in rank order (collective)
    def barrier(self) -> None: ...
    def heartbeat(self, activity: str) -> None: ...
    def check_peers(self) -> None: ...
    # `checkpoint`: a training.run_dir.CheckpointDir, which names the files of a checkpoint folder
    def save_model_and_optimizer(self, checkpoint, model, optimizer) -> None: ...
    def load_model_and_optimizer(self, checkpoint, model, optimizer) -> None: ...
    def full_state_dict(self, model) -> dict | None: ...
    def diagnose(self, error: BaseException) -> TuneforgeError | None: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------- checkpoints of whole (replicated) weights


def read_checkpoint_file(path: Path, load: Callable):
    """`load(path)`, or CheckpointError naming the file when it is missing or damaged (a truncated write)."""
    try:
        return load(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # safetensors' SafetensorError, torch's unpickling and zip errors, OSError
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {str(e)[:200]})") from None


def save_weights_and_optimizer(checkpoint, model, optimizer) -> None:
    """The trainable weights (safetensors) and the optimizer's state, as one process holds them."""
    save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad},
              checkpoint.weights)
    torch.save(optimizer.state_dict(), checkpoint.optimizer)


def copy_weights(folder: Path, model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing = sorted(expected - set(weights))[:3]
        raise CheckpointError(f"checkpoint {folder} does not match this model/method (e.g. missing {missing}); "
                              "resume with the same spec, or start a new output_dir")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)


def load_weights_and_optimizer(checkpoint, model, optimizer) -> None:
    """Read both files before touching the model (a damaged one is named and nothing is applied)."""
    weights = read_checkpoint_file(checkpoint.weights, load_file)
    state = read_checkpoint_file(checkpoint.optimizer, lambda p: torch.load(p, weights_only=True))
    copy_weights(checkpoint.path, model, weights)
    try:
        optimizer.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {checkpoint.path} does not match this optimizer: {e}") from None


class SingleDevice:
    """One process, one device."""

    world_size = 1
    rank = 0
    local_rank = 0
    name = "single"
    sharded = False
    grad_scale = 1.0

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main(self) -> bool:
        return True

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def build_optimizer(self, params: list, make: Callable, lr: float, weight_decay: float):
        return make(params)

    def accumulate(self, wrapped: torch.nn.Module, is_last: bool):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()

    def step_grad_norm(self) -> float | None:
        return None

    def all_reduce_sum(self, value: float) -> float:
        return value

    def all_reduce_max(self, value: float) -> float:
        return value

    def gather_floats(self, value: float) -> list[float]:
        return [value]

    def barrier(self) -> None:
        return None

    def heartbeat(self, activity: str) -> None:
        return None

    def check_peers(self) -> None:
        return None

    def save_model_and_optimizer(self, checkpoint, model, optimizer) -> None:
        save_weights_and_optimizer(checkpoint, model, optimizer)

    def load_model_and_optimizer(self, checkpoint, model, optimizer) -> None:
        load_weights_and_optimizer(checkpoint, model, optimizer)

    def full_state_dict(self, model) -> dict | None:
        return None  # the model itself holds its full weights

    def diagnose(self, error: BaseException) -> TuneforgeError | None:
        return None

    def close(self) -> None:
        return None
