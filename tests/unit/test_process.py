"""`process.fork_call`: the service forks each training attempt from its worker (which imported the training
stack once). The child must behave as the fresh `python -m tuneforge.service.runner` it replaces: its own
output file, Python's default stop signals, its exit status (or -signal) for the parent, the runner's command
line in `ps`, and death with its parent."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneforge.process import fork_call

TITLE = "python -m tuneforge.service.runner ftjob-test worker-test"


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def test_exit_status_output_and_title(tmp_path):
    def child() -> int:
        print("to stdout")
        print("to stderr", file=sys.stderr)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        return 3 if _cmdline(os.getpid()) == TITLE else 9

    previous = signal.signal(signal.SIGTERM, lambda *a: None)  # a worker's handler: not the child's
    try:
        proc = fork_call(child, output=tmp_path / "out.log", title=TITLE)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert proc.wait(timeout=30) == 3
    assert (tmp_path / "out.log").read_text().splitlines() == ["to stdout", "to stderr"]


def test_a_crash_is_status_2_with_its_traceback_and_a_signal_is_negative(tmp_path):
    def crash() -> int:
        raise RuntimeError("boom in the child")

    assert fork_call(crash, output=tmp_path / "crash.log", title=TITLE).wait(timeout=30) == 2
    assert "RuntimeError: boom in the child" in (tmp_path / "crash.log").read_text()

    proc = fork_call(lambda: time.sleep(60) or 0, output=tmp_path / "sleep.log", title=TITLE)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    proc.kill()  # already gone: nothing happens
    assert proc.poll() == -signal.SIGTERM


def test_the_child_dies_with_its_parent(tmp_path):
    """A parent killed with -9 takes its forked child along (PR_SET_PDEATHSIG), as it does a spawned runner."""
    code = (f"import sys, time\nsys.path.insert(0, {str(Path(__file__).parents[2] / 'src')!r})\n"
            "from tuneforge.process import fork_call\n"
            f"proc = fork_call(lambda: time.sleep(120) or 0, output={str(tmp_path / 'c.log')!r}, title={TITLE!r})\n"
            "print(proc.pid, flush=True)\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        deadline = time.time() + 30
        while _cmdline(child) != TITLE:  # the child sets its title just after the fork
            assert time.time() < deadline, _cmdline(child)
            time.sleep(0.02)
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.time() + 30
        while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
            assert time.time() < deadline, "the forked child outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()


def test_frozen_imports_leave_the_collector_which_still_frees_new_cycles():
    """freeze_loaded_objects (the CLI, the training entry and the service's worker call it once the training stack is
    imported): what was loaded is no longer in the collector's generations, so a run's full collections skip it;
    a reference cycle made afterwards is still found and freed."""
    code = ("import gc, torch\n"
            "from tuneforge.process import freeze_loaded_objects\n"
            "before = len(gc.get_objects())\n"
            "freeze_loaded_objects()\n"
            "after = len(gc.get_objects())\n"
            "class Cycle: pass\n"
            "c = Cycle(); c.me = c; del c\n"
            "print(before, after, gc.get_freeze_count(), gc.collect())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, after, frozen, collected = map(int, out.stdout.split())
    assert before > 50_000 and after < 100, (before, after)
    assert frozen >= before and collected >= 1, (frozen, collected)
