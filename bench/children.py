"""What the bench scripts that compare two tools in their own processes share: run one child, measured whole."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def measured_child(args: list[str], label: str) -> dict:
    """Run `python ARGS`; its last stdout line is a JSON object, returned with the child's wall time and peak
    RSS. RUSAGE_CHILDREN is a running maximum over every child this process waited for, so call it once per
    fresh parent process (the scripts start one per run)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result
