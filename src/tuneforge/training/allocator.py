"""glibc's malloc keeps freed large buffers for reuse. QLoRA on CPU dequantises every 4-bit weight into
a fresh buffer at each use, the heap fragments, and peak RSS grows well past what is live. With a
fixed 1 MiB mmap threshold, buffers above it are mapped and returned to the OS on free. Measured:
QLoRA on a 1.1B model peaks at 1.48 GB instead of 2.25 GB. Page faults make it slow elsewhere (a
SmolLM2 LoRA epoch at 0.73-0.80x, with gradient checkpointing 0.60x), so only the runs whose point is
memory use it (`returns_big_buffers`): qlora, and the ZeRO strategies, whose ranks' gathered-weight and
gradient buffers fragment the heap the same way (SmolLM2 full fine-tuning at 2 ranks, per-rank peak:
zero3 3.2 GB without it, 1.9-2.0 GB with it, against 2.9-3.2 GB in one process). See docs/benchmarks.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
THRESHOLD_BYTES = 1 << 20


def returns_big_buffers(spec) -> bool:
    """Whether a run of `spec` (a JobSpec) sets the fixed mmap threshold: on CPU, QLoRA and ZeRO 1-3."""
    from tuneforge.hardware import resolve_device

    if resolve_device(spec.device).type != "cpu":
        return False
    sharded = spec.distributed is not None and spec.distributed.strategy in ("zero1", "zero2", "zero3")
    return spec.method == "qlora" or sharded


def return_big_buffers_to_os(threshold: int = THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold for this process (also stops glibc raising it); False if not glibc."""
    libc = _glibc()
    try:
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) if libc else False
    except AttributeError:  # not glibc (e.g. musl has no mallopt)
        return False
    log.debug("malloc mmap threshold %d bytes: %s", threshold, ok)
    return ok


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS (glibc `malloc_trim`): after loading a model, the buffers of the
    conversion (a GGUF file dequantised, fp32 -> bf16) are free but still resident, and a run's steps do not
    reuse all of them (SmolLM2 DoRA: 377 MB above its weights before the first step). False if not glibc."""
    import gc

    gc.collect()
    libc = _glibc()
    try:
        return bool(libc.malloc_trim(0)) if libc else False
    except AttributeError:  # not glibc
        return False


def _glibc():
    """The C library on Linux (None elsewhere or when it cannot be loaded)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
