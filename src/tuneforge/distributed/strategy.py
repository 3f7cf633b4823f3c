"""The interface between the training loop and data parallelism.

The loop calls only these methods, so a torch.distributed strategy (DDP, FSDP2, DeepSpeed ZeRO)
can replace `SingleDevice` without touching the loop.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Strategy(Protocol):
    world_size: int
    rank: int
    device: torch.device

    @property
    def is_main(self) -> bool: ...
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def all_reduce_sum(self, value: float) -> float: ...
    def barrier(self) -> None: ...


class SingleDevice:
    """One process, one device."""

    world_size = 1
    rank = 0

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main(self) -> bool:
        return True

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def all_reduce_sum(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        return None
