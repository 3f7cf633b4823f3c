"""Run metrics: `metrics.jsonl` (one object per logged step), TensorBoard, and the loss-curve PNG."""
from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

from tuneforge.files import atomic_write_text
from tuneforge.training.run_dir import EVAL_LOSS, TRAIN_LOSS, RunDir, parse_metrics

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


class MetricsLogger:
    """Appends JSON lines and mirrors scalars to TensorBoard (if installed).

    On resume it keeps the lines up to the checkpoint's step (later ones will be logged again) and
    drops unreadable ones; `repaired` says how many were dropped."""

    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = True):
        run = RunDir(run_dir)
        self.path = run.metrics
        self.repaired = 0
        if resume_step and self.path.exists():
            rows, self.repaired = parse_metrics(self.path.read_text(encoding="utf-8", errors="replace"))
            kept = [r for r in rows if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run.tensorboard), purge_step=resume_step or None)
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


def plot_loss_curve(run_dir: Path) -> Path | None:
    """Write `loss_curve.png` (train and validation loss against step)."""
    run = RunDir(run_dir)
    rows = run.read_metrics()
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    train = [(r["step"], r[TRAIN_LOSS]) for r in rows if TRAIN_LOSS in r]
    evals = [(r["step"], r[EVAL_LOSS]) for r in rows if EVAL_LOSS in r]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run.loss_curve
    fig.savefig(out)
    plt.close(fig)
    return out
