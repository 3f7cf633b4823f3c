"""What a training process costs before its model exists: measured once per machine and library versions.

A CPU run's peak RSS is this baseline (Python, torch, transformers, peft, bitsandbytes, TensorBoard's writer,
the tokenizer, OpenMP's thread pools, matplotlib for the loss curve drawn at the end) plus the live tensors the probe measures (planning/probe.py). It is
measured in a child process that imports exactly what `tuneforge train` imports, loads the tokenizer and
runs one tiny matmul in every intra-op thread, and is cached under $TUNEFORGE_CACHE/plan/.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from tuneforge.errors import TuneforgeError

CACHE_VERSION = 5  # 4: the peak is VmHWM (ru_maxrss carried the parent's peak into the child); 5: keyed by the
# tokenizer's files, not its folder (a copied or moved model, or a test's temporary one, reuses the figure)
# what a training process may import: their versions key the cached figures (an installed DeepSpeed, say, is
# imported by transformers and moves the baseline; a cached baseline of 783 MB stood where a fresh one was 476)
LIBRARIES = ("tuneforge", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "deepspeed", "tokenizers",
             "safetensors", "tensorboard", "matplotlib", "onnxruntime")


def library_versions() -> dict[str, str | None]:
    """Installed versions of LIBRARIES (None: not installed)."""
    from importlib import metadata

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def tokenizer_digest(folder: Path) -> str:
    """What the baseline depends on in a model folder: its tokenizer files' bytes (sha1), not where they are."""
    from tuneforge.models.load import TOKENIZER_FILES

    h = hashlib.sha1()
    for name in (*TOKENIZER_FILES, "merges.txt", "special_tokens_map.json", "added_tokens.json"):
        path = folder / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _baseline_child(tokenizer_path: str) -> None:
    import torch

    import tuneforge.inference  # noqa: F401  (what `tuneforge train` imports through the API)
    import tuneforge.training.recipe  # noqa: F401
    from tuneforge.training.metrics import MetricsLogger  # noqa: F401

    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (the run's metrics writer)
    except ImportError:
        pass
    import peft  # noqa: F401

    if tokenizer_path:
        from tuneforge.models import load_tokenizer

        load_tokenizer(Path(tokenizer_path))
    import matplotlib  # the loss curve drawn at the end of a run (training/metrics.plot_loss_curve)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([0, 1], [1, 0])
    fig.canvas.draw()
    plt.close(fig)
    a = torch.randn(256, 256)
    for _ in range(4):  # start the intra-op thread pool
        a = (a @ a).tanh_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (a @ a).sum()
    from tuneforge.training.metrics import peak_rss_mb  # this process's own peak, not its parent's (see there)

    print(json.dumps({"rss_mb": peak_rss_mb()}))


def baseline_cache_path(tokenizer_path: Path | None, threads: int) -> tuple[Path, dict]:
    """(the cached baseline's file, its key): library versions, Python, threads and the tokenizer's content."""
    from tuneforge.models.load import cache_dir

    key = {"v": CACHE_VERSION, "libraries": library_versions(), "python": sys.version,
           "tokenizer": tokenizer_digest(tokenizer_path) if tokenizer_path else "", "threads": threads}
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
    return cache_dir() / "plan" / f"baseline-{digest}.json", key


def process_baseline_mb(tokenizer_path: Path | None = None, *, threads: int | None = None, use_cache: bool = True) -> float:
    """Peak RSS (MB) of a process set up for training, before any model: the CPU baseline."""
    import os

    import torch

    from tuneforge.files import atomic_write_text

    has_tokenizer = tokenizer_path is not None and any(
        (Path(tokenizer_path) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tok = Path(tokenizer_path).resolve() if has_tokenizer else None
    threads = threads or torch.get_num_threads()
    path, key = baseline_cache_path(tok, threads)
    if use_cache and path.is_file():
        try:
            return float(json.loads(path.read_text())["rss_mb"])
        except (OSError, ValueError, KeyError):
            pass
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", f"from tuneforge.planning.calibrate import _baseline_child; "
                           f"_baseline_child({str(tok or '')!r})"], capture_output=True, text=True, env=env,
                          timeout=300)
    if proc.returncode != 0:
        raise TuneforgeError(f"could not measure the process baseline: {proc.stderr.strip()[-500:]}")
    rss = float(json.loads(proc.stdout.strip().splitlines()[-1])["rss_mb"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"rss_mb": rss, "key": key}))
    return rss
