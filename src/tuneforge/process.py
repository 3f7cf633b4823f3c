"""Process-wide settings, made only at a process's entry point (the CLI, the training entry, the service's
worker and runner): quiet library logging, stop signals that wait for a step boundary, dying with the
parent, and the loaded modules kept out of the garbage collector's sight. Library calls never set any of these."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
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


def freeze_loaded_objects() -> None:
    """`gc.freeze()` every object loaded so far, once an entry point has imported the training stack: the cyclic
    collector never scans them again. Over torch, transformers and peft (~350k objects) a full collection takes
    0.2-0.3 s, and a run collects twice (after loading the model, to return the loading's buffers to the OS; after
    releasing it, while a process group still exists); a forked child also keeps sharing those objects' pages (a
    collection writes to every object it scans). Those modules live as long as the process, so nothing is kept
    that would have been freed; no collection runs first (the few cycles imports leave are not worth a full pass)."""
    import gc

    gc.freeze()


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


class Forked:
    """A child made by `fork_call`, with the part of `subprocess.Popen` a parent that watches it needs."""

    def __init__(self, pid: int, title: str):
        self.pid, self.args, self.returncode = pid, title, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N: killed by signal N, as Popen says it
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_call(target, *, output, title: str) -> Forked:
    """Run `target()` (returning an exit status) in a child forked from this process, which keeps every module
    this process imported: no interpreter start, no imports. The child's stdout and stderr go to the file
    `output`, its stop signals are Python's defaults again, it dies with this process (as `die_with_parent`),
    and `ps` shows it as `title`. Call it only from a process with one thread that never ran torch's thread
    pool or CUDA (a worker that only imported them): a fork copies neither threads nor a GPU context."""
    parent = os.getpid()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid:
        return Forked(pid, title)
    code = 2
    try:
        die_with_parent(parent)()
        fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        # new text streams over fds 1 and 2: the parent's sys.stdout may be anything (a pytest capture, a pipe)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        for handler in logging.getLogger().handlers:  # basicConfig's handler holds the parent's stderr
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setStream(sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        import setproctitle

        setproctitle.setproctitle(title)
        code = target()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 — the child must never return into its parent's code
        import traceback

        traceback.print_exc()
    finally:
        try:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
