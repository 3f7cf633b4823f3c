"""`tuneforge ARGS` as a real process of its own, started without paying the imports again.

A fresh `python -m tuneforge.cli` spends ~3.5 s of CPU importing torch, transformers and peft before it does
anything, and the suite runs the CLI a few dozen times. Here each call is forked from a server process that
imported them once (multiprocessing's forkserver, one per test worker, with `tests.cli_preload` preloaded).
The child is still a process of its own: its own stdin, stdout and stderr (files here, read back after),
environment, working directory and exit code, and it runs exactly what the `tuneforge` script runs
(`cli.main(argv)`, then exit with its code).

What it does not exercise is a fresh interpreter's start: the tests that check that (the CLI imports no torch
until it needs it, signals, kill -9, the ranks' launcher) start `python -m tuneforge.cli` themselves.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_context = None


def preloaded_forkserver():
    """multiprocessing's forkserver context, its server preloading tests.cli_preload (set before it starts)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["tests.cli_preload"])
    return _context


def _child(argv: list[str], env: dict, cwd: str | None, stdin: str, stdout: str, stderr: str) -> None:
    """In the forked process: the caller's environment, directory and standard streams, then the CLI."""
    os.environ.clear()
    os.environ.update(env)
    if cwd:
        os.chdir(cwd)
    for fd, path, flags in ((0, stdin, os.O_RDONLY), (1, stdout, os.O_WRONLY), (2, stderr, os.O_WRONLY)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
    sys.argv = ["tuneforge", *argv]
    import torch

    # what a fresh interpreter takes from OMP_NUM_THREADS at start (the preloaded one read it long ago)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    from tuneforge.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def run_cli(args, *, env: dict | None = None, cwd: Path | str | None = None, input: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Like subprocess.run([python, -m, tuneforge.cli, *args], capture_output=True, text=True, ...)."""
    argv = [str(a) for a in args]
    with tempfile.TemporaryDirectory(prefix="tuneforge-cli-") as tmp:
        streams = [Path(tmp, name) for name in ("stdin", "stdout", "stderr")]
        streams[0].write_text(input or "", encoding="utf-8")
        for path in streams[1:]:
            path.touch()
        proc = preloaded_forkserver().Process(target=_child, args=(argv, dict(os.environ if env is None else env),
                                                          str(cwd) if cwd else None, *map(str, streams)))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join(10)
            raise subprocess.TimeoutExpired(["tuneforge", *argv], timeout, streams[1].read_text(encoding="utf-8"),
                                            streams[2].read_text(encoding="utf-8"))
        return subprocess.CompletedProcess(["tuneforge", *argv], proc.exitcode,
                                           streams[1].read_text(encoding="utf-8"),
                                           streams[2].read_text(encoding="utf-8"))
