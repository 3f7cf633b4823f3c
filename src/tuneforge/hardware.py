"""Device and numeric precision: which device a job runs on and in which dtype it computes.

Shared by training and inference, so both resolve `device: auto` and `precision: auto` the same way.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from tuneforge.errors import SpecError

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecError("device: cuda was asked for but no CUDA device is visible; use device: auto or cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run ~3x faster than fp32 on this CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    fp16 always trains with a gradient scaler (see `grad_scaler`). On CPU it is allowed when asked for
    by name but has no fast path (measured 0.4 GFLOP/s here); `auto` never picks it there.
    """
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type == "cpu":
            log.warning("training.precision fp16 on CPU has no fast path (measured 0.4 GFLOP/s); bf16 or auto is faster")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def resolve_base_dtype(base_dtype: str, method: str, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype frozen base weights are stored in (trainable weights always stay fp32)."""
    if base_dtype == "bf16" and method == "full":
        raise SpecError("training.base_dtype: bf16 needs a frozen base; full fine-tuning keeps fp32 master weights")
    if base_dtype == "auto":
        return torch.bfloat16 if autocast_dtype == torch.bfloat16 and method != "full" else torch.float32
    return torch.bfloat16 if base_dtype == "bf16" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16's 5-bit exponent flushes small gradients to zero; the scaler multiplies the loss up before
    backward and divides the gradients back before the optimizer step (skipping steps that overflowed).
    Disabled (a no-op) for fp32 and bf16, whose exponent range is fp32's."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
