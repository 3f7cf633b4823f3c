"""The worker's choice between forked and fresh training attempts (service/worker.py), in process: the real
attempts run in tests/service/test_faults.py and the other service tests."""
from __future__ import annotations

import logging
import subprocess
import sys

from tuneforge.service.context import ServiceContext
from tuneforge.service.settings import ServiceSettings
from tuneforge.service.worker import Worker


def _worker(tmp_path, **settings) -> Worker:
    return Worker(ServiceContext.open(ServiceSettings(data_dir=tmp_path / "data", **settings)))


def test_a_worker_that_cannot_import_the_training_stack_starts_fresh_processes(tmp_path, monkeypatch, caplog):
    worker = _worker(tmp_path)
    assert worker.forking is None  # decided when the first job is queued
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError, as a broken install does
    with caplog.at_level(logging.ERROR, logger="tuneforge.service.worker"):
        worker.preload()
    assert worker.forking is False, "a failed import must not be retried on every poll"
    assert "could not import the training stack; training attempts start as fresh processes" in caplog.text
    proc = worker.start_attempt("ftjob-none", tmp_path / "attempt-1.log")
    try:
        assert isinstance(proc, subprocess.Popen)
        assert proc.args[1:] == ["-m", "tuneforge.service.runner", "ftjob-none", worker.id]
    finally:
        proc.kill()
        proc.wait(timeout=60)
        worker.ctx.store.dispose()


def test_fork_attempts_off_never_imports_the_training_stack_in_the_worker(tmp_path):
    worker = _worker(tmp_path, fork_attempts=False)
    assert worker.forking is False
    worker.ctx.store.dispose()
