"""Causal-LM loss as a *sum* over target tokens, so the caller can normalise by the target count
of the whole accumulated batch (a mean of per-micro-batch means would weight short batches up)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.encode import IGNORE_INDEX


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry loss after the next-token shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T', V) with T' >= T (prompt tuning prepends virtual tokens), labels (B, T).

    Returns (summed cross-entropy over targets, number of correctly predicted targets).
    """
    T = labels.shape[1]
    logits = logits[:, -T:]  # drop virtual-token positions, if any
    pred = logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V): fp32 log-softmax for a stable loss
    target = labels[:, 1:].flatten()  # (B*(T-1),)
    loss = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        mask = target != IGNORE_INDEX
        correct = (pred.argmax(-1)[mask] == target[mask]).sum()
    return loss, correct
