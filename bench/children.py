"""What the bench scripts that compare two tools, each run in its own process, share: one child measured whole
(wall time, peak RSS), and the per-round line they print."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def measured_child(args: list[str], label: str, measure: bool = True) -> dict:
    """Run `python ARGS`; its last stdout line is a JSON object, returned with (`measure`) the child's wall time
    and peak RSS added. RUSAGE_CHILDREN is a running maximum over every child this process waited for: use
    `in_fresh_parent` to measure one child per parent."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if measure:
        result["wall_seconds"] = wall
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def in_fresh_parent(args: list[str], label: str, tokens: int) -> dict:
    """`measured_child(args)` from a parent process of its own (so its peak RSS is that child's alone), with
    tokens/s in the measured function and over the whole process."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from children import measured_child; print(json.dumps(measured_child({args!r}, {label!r})))")
    res = measured_child(["-c", code], label, measure=False)  # the fresh parent's figures: its one child's
    res["tokens_per_second"] = tokens / res["train_seconds"]
    res["tokens_per_second_whole_process"] = tokens / res["wall_seconds"]
    return res


def print_round(r: int, tool: str, res: dict) -> None:
    print(f"round {r + 1} {tool:9s}: {res['tokens_per_second']:.0f} tok/s in train(), "
          f"{res['tokens_per_second_whole_process']:.0f} tok/s whole process, "
          f"peak RSS {res['peak_rss_mb']:.0f} MB, loss {res['final_loss']:.3f}", file=sys.stderr)
