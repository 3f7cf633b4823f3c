"""Fixtures for the 2-process tests: distinct chat examples (13: the last global step of an epoch has
fewer micro-batches than ranks, so a rank runs an empty one), specs, and the CLI as a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_spec, write_jsonl

N_EXAMPLES = 13


def chat_records(n: int = N_EXAMPLES) -> list[dict]:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
             "kilo", "lima", "mike", "november", "oscar"]
    return [{"messages": [{"role": "user", "content": f"Say {words[i]} {'twice ' * (i % 3)}please"},
                          {"role": "assistant", "content": f"{words[i]} " * (1 + i % 4) + "done."}]}
            for i in range(n)]


@pytest.fixture
def dist_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", chat_records())


def dist_spec(model_dir: Path, data: Path, out: Path, method: str = "lora", world: int = 1,
              distributed: dict | None = None, **training) -> dict:
    """1 process: grad_accum 2 (global batch 4); `world` ranks: grad_accum 1 each, same global batch."""
    training = {"batch_size": 2, "grad_accum": 2 // world, "max_steps": 4, "lr": 1e-2, **training}
    spec = tiny_spec(model_dir, data, out, **training)
    spec["method"] = method
    if method == "full":
        spec["training"]["lr"] = 1e-3
    if distributed is not None:
        spec["distributed"] = {"nproc": world, "timeout_seconds": 60, **distributed}
    return spec


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def cli(*args: str, timeout: float = 240, cwd: Path | None = None, **popen) -> subprocess.CompletedProcess:
    """`tuneforge ARGS` in a subprocess with one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd, **popen)


DOC = Path(__file__).parents[2] / "docs" / "distributed.md"


def write_matrix(backend: str, strategies: tuple[str, ...], methods: tuple[str, ...], results: dict,
                 refused: dict[tuple[str, str], str]) -> None:
    """Rewrite the `backend` compatibility table in docs/distributed.md (between its markers) from this
    test run: pass = losses and weights within 1e-4 of one process; refused = a clear spec error up front."""
    import fcntl

    rows = ["| method | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]
    for m in methods:
        cells = []
        for s in strategies:
            res = results.get(f"{m}/{s}")
            if (m, s) in refused:
                cells.append(f"refused ({refused[(m, s)]})")
            elif res is None:
                cells.append("not tested")
            else:
                cells.append("pass" if res["ok"] else "**fail**")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    start, end = f"<!-- matrix:{backend} -->", f"<!-- /matrix:{backend} -->"
    import tempfile

    with open(Path(tempfile.gettempdir()) / "tuneforge-distributed-doc.lock", "w") as lock:  # two test workers
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = DOC.read_text()
        if start not in text or end not in text:
            return
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        DOC.write_text(head + start + "\n" + "\n".join(rows) + "\n" + end + tail)
