"""Measure a real run: trained in a fresh process by the training entry (peak RSS is per process, so a run
measured in-process would inherit its caller's resident set), its summary and per-step times read back."""
from __future__ import annotations

import json
import os
import random
import statistics
from dataclasses import dataclass
from pathlib import Path


from tuneforge.errors import TuneforgeError
from tuneforge.training.run_dir import RunDir

WORDS = ("the order parcel arrived late and the customer asked for a refund while support checked the tracking "
         "number warehouse invoice delivery address payment card account password reset shipping label return "
         "policy manager ticket priority urgent resolved pending escalated weekend holiday").split()


def write_fixed_length_text(path: Path, examples: int, words: int = 1500, seed: int = 0) -> Path:
    """A `text`-task JSONL whose examples are all longer than any max_seq_len used with it, so that with
    `data.overlong: truncate` every micro-batch is exactly batch_size x max_seq_len tokens."""
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) for _ in range(examples)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Measured:
    peak_rss_mb: float
    step_seconds: float  # median optimizer-step time after the first (warm-up) step
    first_step_seconds: float
    steps: int
    summary: dict


def step_times(run_dir: Path) -> list[float]:
    """Per-step wall times from metrics.jsonl (each row's tokens_per_second is cumulative over the session)."""
    run = RunDir(run_dir)
    return _diff_times(run.read_metrics(), run.read_summary() or {})


def _diff_times(rows: list[dict], summary: dict) -> list[float]:
    per_step = summary["tokens_seen"] / max(summary["steps"], 1)  # fixed-size batches: same tokens each step
    elapsed = [r["step"] * per_step / r["tokens_per_second"] for r in rows if r.get("tokens_per_second")]
    return [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)]


def measure_run(spec: dict, run_dir: Path, *, threads: int | None = None, timeout: float = 1800) -> Measured:
    """Train `spec` (a dict; output_dir is set to `run_dir`, replacing an earlier run there) in a process of its own
    (the training entry: peak RSS is per process, and several ranks are launched from there) and measure it."""
    from tuneforge.spec import build_spec
    from tuneforge.training.entry import TrainingProcess

    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    job = build_spec({**spec, "output_dir": str(run_dir)})
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    child = TrainingProcess(job, overwrite=True, env=env, capture=True)
    try:
        parsed = child.wait(timeout=timeout)
    except TuneforgeError as e:
        raise TuneforgeError(f"measured run {run_dir.name} failed: {str(e)[-800:]}") from None
    summary = parsed.model_dump(mode="json")
    times = step_times(run_dir)
    later = times[1:] or times
    return Measured(summary["peak_rss_mb"], statistics.median(later), times[0] if times else 0.0, len(times), summary)
