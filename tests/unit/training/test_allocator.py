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
