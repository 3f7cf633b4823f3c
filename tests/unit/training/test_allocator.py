"""training/allocator.py: the heap's free pages go back to the OS after a model load."""
from __future__ import annotations

import sys

import pytest

from tuneforge.training.allocator import release_free_memory


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_free_memory_returns_freed_heap_pages():
    """Small buffers (below glibc's mmap threshold) freed below a live one stay resident until trimmed."""
    chunks = [bytearray(b"x" * 64 * 1024) for _ in range(2048)]  # 128 MiB of 64 KiB heap chunks, pages touched
    keep = bytearray(b"y" * 64 * 1024)  # above them on the heap: free() alone cannot shrink the heap's top
    del chunks
    before = _rss_mb()
    assert release_free_memory()
    after = _rss_mb()
    assert before - after >= 64, (before, after)
    del keep


@pytest.mark.parametrize("method, distributed, device, expected", [
    ("qlora", None, "cpu", True), ("lora", None, "cpu", False), ("full", None, "cpu", False),
    ("full", {"strategy": "ddp", "nproc": 2}, "cpu", False), ("full", {"strategy": "zero1", "nproc": 2}, "cpu", True),
    ("lora", {"strategy": "zero2", "nproc": 2}, "cpu", True),
    ("full", {"strategy": "zero3", "backend": "deepspeed", "nproc": 2}, "cpu", True),
])
def test_the_memory_first_runs_return_big_buffers(method, distributed, device, expected):
    """On CPU the fixed mmap threshold is for the runs whose point is memory: qlora and ZeRO 1-3, not ddp or one
    process (page faults cost those 20-27 % of their speed; training/allocator.py)."""
    from tuneforge.spec import build_spec
    from tuneforge.training.allocator import returns_big_buffers

    spec = build_spec({"model": "m", "data": {"train": "t.jsonl"}, "method": method, "device": device,
                       **({"distributed": distributed} if distributed else {})})
    assert returns_big_buffers(spec) is expected
