"""training/metrics.peak_rss_mb: a process's own peak, not the peak of the process that started it.

Linux carries the parent's resident high-water mark into a child's ru_maxrss across fork + exec; CI's pytest
worker (1.47 GB) made two different SmolLM2 runs it started report exactly 1,473.7 MB each, and the planner's
process baseline, measured in a child the same way, came out about 900 MB too high."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tuneforge.training.metrics import peak_rss_mb


def _child_peaks() -> tuple[float, float]:
    code = ("import resource; from tuneforge.training.metrics import peak_rss_mb; "
            "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and the inherited ru_maxrss are Linux's")
def test_a_child_reports_its_own_peak_not_its_parents():
    big = bytearray(1024 * 2**20)  # 1 GiB with every page touched: this process's high-water mark is above it
    big[::4096] = b"x" * len(big[::4096])
    del big
    assert peak_rss_mb() >= 1024
    own, inherited = _child_peaks()
    assert inherited >= 1024, inherited  # the kernel's behaviour this guards against (fails if it ever changes)
    assert 0 < own < 300, own  # the child imports tuneforge.training.metrics only
