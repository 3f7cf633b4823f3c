"""How long does the planner take to give its first answer on a shape it has not probed, as the service's
planning thread asks it (one method, a process whose imports are done, the machine's baseline calibrated)?

Phi-3-mini's shape (tests/data/phi3-mini/config.json), QLoRA, 1 x 128 tokens, 24 GiB: one cached answer
first (imports, baseline), then `--tries` fresh probes (`use_cache=False`), then the cached answer again.
Run it alone; for an A/B against another checkout, run it again with PYTHONPATH=OTHER/src in the same session:

    flock .cache/bench.lock .venv/bin/python bench/plan_first_answer.py
    PYTHONPATH=/tmp/old/src flock .cache/bench.lock .venv/bin/python bench/plan_first_answer.py

Prints one JSON object (seconds of each fresh answer, the cached one, the predicted peak and step time).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "tests" / "data" / "phi3-mini"))
    ap.add_argument("--method", default="qlora")
    ap.add_argument("--tries", type=int, default=2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    from tuneforge import api

    imports = time.perf_counter() - t0
    spec = api.resolve_job({"model": args.model, "data": {"train": "-"}},
                           ["training.batch_size=1", "training.max_seq_len=128"])
    kw = {"methods": (args.method,), "memory_gb": 24}
    api.plan(spec, **kw)  # warm: baseline and the process's own imports
    fresh = []
    for _ in range(args.tries):
        t = time.perf_counter()
        row = api.plan(spec, use_cache=False, **kw).rows_[0]
        fresh.append({"seconds": round(time.perf_counter() - t, 2), "peak_mb": round(row.predicted_peak_mb, 1),
                      "step_seconds": round(row.predicted_step_seconds, 2)})
    t = time.perf_counter()
    api.plan(spec, **kw)
    print(json.dumps({"tuneforge": api.__file__, "imports_seconds": round(imports, 2), "fresh": fresh,
                      "cached_seconds": round(time.perf_counter() - t, 3)}, indent=2))


if __name__ == "__main__":
    main()
