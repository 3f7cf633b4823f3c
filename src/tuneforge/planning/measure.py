"""Measure a real run: `tuneforge train` in a fresh process (peak RSS is per process, so a run measured
in-process would inherit its caller's resident set), read back its summary and per-step times."""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneforge.errors import TuneforgeError
from tuneforge.training.events import summary_in_output

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
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return _diff_times(rows, json.loads((run_dir / "summary.json").read_text()))


def _diff_times(rows: list[dict], summary: dict) -> list[float]:
    per_step = summary["tokens_seen"] / max(summary["steps"], 1)  # fixed-size batches: same tokens each step
    elapsed = [r["step"] * per_step / r["tokens_per_second"] for r in rows if r.get("tokens_per_second")]
    return [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)]


def measure_run(spec: dict, run_dir: Path, *, threads: int | None = None, timeout: float = 1800,
                extra_args: tuple[str, ...] = ()) -> Measured:
    """Train `spec` (a dict; output_dir is set to `run_dir`) in a child process and measure it."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "output_dir": str(run_dir)}
    spec_path = run_dir.parent / f"{run_dir.name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "tuneforge.cli", "train", str(spec_path), "--quiet", "--json", "--overwrite",
           *extra_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise TuneforgeError(f"measured run {run_dir.name} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    parsed = summary_in_output(proc.stdout)
    if parsed is None:
        raise TuneforgeError(f"measured run {run_dir.name} printed no summary: {proc.stdout.strip()[-300:]!r}")
    summary = parsed.model_dump(mode="json")
    times = step_times(run_dir)
    later = times[1:] or times
    return Measured(summary["peak_rss_mb"], statistics.median(later), times[0] if times else 0.0, len(times), summary)
