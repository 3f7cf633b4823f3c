"""Process-wide settings, made only at a process's entry point (the CLI, the training entry, the service's
worker and runner): quiet library logging, stop signals that wait for a step boundary, and dying with the
parent. Library calls never set any of these."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import warnings
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1


def quiet_libraries() -> None:
    """Library chatter (weight-loading bars, optional-kernel notices) hides our own progress."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers imports DeepSpeed whenever it is installed; on a CPU machine its import warns that no GPU was found
    logging.getLogger("DeepSpeed").addFilter(lambda r: "Setting accelerator to CPU" not in r.getMessage())
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@contextmanager
def stop_on_signals(stop, *, announce: bool = True):
    """Ctrl-C or SIGTERM (a scheduler or container stop) while training: `stop` is requested, so the loop finishes
    its step, writes a checkpoint and returns "stopped". Outside the training loop (`stop.armed` false), or a
    second time, they interrupt at once (KeyboardInterrupt)."""

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if stop.armed and not stop:
            stop.request(name)
            if announce:
                print(f"\n{name}: stopping after this step, with a checkpoint (press Ctrl-C again to stop at once)",
                      file=sys.stderr, flush=True)
            return
        stop.request(name)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _set_parent_death_signal() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: children may outlive a killed parent
        pass


def die_with_parent(parent: int | None = None):
    """A preexec_fn: the kernel sends SIGKILL to this child when its parent dies (Linux), so no training
    outlives whoever started it. Call it in the parent (`preexec_fn=die_with_parent()`): the child then also
    exits at once if the parent died before the request was registered."""
    parent = parent or os.getpid()

    def preexec() -> None:
        _set_parent_death_signal()
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def exit_with_parent() -> None:
    """The same, from inside the child (for processes another library starts: the ranks torch's launcher starts)."""
    _set_parent_death_signal()
