"""Run metrics: `metrics.jsonl` (one object per logged step), TensorBoard, and the loss-curve PNG."""
from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

from tuneforge.files import atomic_write_text

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """This process's peak resident set in MB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process image's own memory. Not getrusage's
    ru_maxrss: the kernel carries the parent's high-water mark into a child across fork/vfork + exec, so a run
    started by a 1.5 GB process (a pytest worker, the service's worker) reported 1.5 GB whatever it used."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # macOS reports bytes, Linux and BSDs KiB


def _parse_lines(text: str) -> tuple[list[dict], int]:
    """(records, number of unreadable lines): a crash mid-write can leave a torn last line."""
    rows, torn = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            torn += 1
    return rows, torn


class MetricsLogger:
    """Appends JSON lines and mirrors scalars to TensorBoard (if installed).

    On resume it keeps the lines up to the checkpoint's step (later ones will be logged again) and
    drops unreadable ones; `repaired` says how many were dropped."""

    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.repaired = 0
        if resume_step and self.path.exists():
            rows, self.repaired = _parse_lines(self.path.read_text(encoding="utf-8", errors="replace"))
            kept = [r for r in rows if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step or None)
            except ImportError:
                log.info("tensorboard not installed; metrics go to metrics.jsonl only")

    def log(self, step: int, **values: float) -> None:
        record = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return _parse_lines(path.read_text(encoding="utf-8", errors="replace"))[0] if path.exists() else []


def plot_loss_curve(run_dir: Path) -> Path | None:
    """Write `loss_curve.png` (train and validation loss against step)."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss_curve.png"
    fig.savefig(out)
    plt.close(fig)
    return out
