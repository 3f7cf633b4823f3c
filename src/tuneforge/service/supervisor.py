"""`tuneforge serve`: the API (uvicorn, in this process) and N worker processes, stopped together on
Ctrl-C / SIGTERM. Workers finish their current step and checkpoint before they exit; jobs they held are
requeued and resume at the next start. A worker that dies (kill -9, out of memory, a crash) is replaced, so
its job is reclaimed and resumed even when it was the only worker."""
from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import threading

from tuneforge.service.context import ServiceContext
from tuneforge.service.settings import ServiceSettings

log = logging.getLogger("tuneforge.service")
WORKER_STOP_SECONDS = 120
WORKER_CHECK_SECONDS = 1.0


def start_workers(settings: ServiceSettings, n: int) -> list[subprocess.Popen]:
    from tuneforge.service.worker import die_with_parent

    env = {**os.environ, **settings.to_env()}
    return [subprocess.Popen([sys.executable, "-m", "tuneforge.service.worker"], env=env,
                             preexec_fn=die_with_parent())
            for _ in range(n)]


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.wait(timeout=WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()


class WorkerPool:
    """N worker processes, each replaced when it dies. The replacements are started by the watching thread,
    and PR_SET_PDEATHSIG fires when the parent *thread* ends: so that thread lives until the workers stop."""

    def __init__(self, settings: ServiceSettings, n: int):
        self.settings = settings
        self.procs = start_workers(settings, n)
        self.lock = threading.Lock()
        self.stopping = False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="worker-pool", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopped.wait(WORKER_CHECK_SECONDS):
            with self.lock:
                if self.stopping:
                    break
                for i, w in enumerate(self.procs):
                    if w.poll() not in (None, 0):  # 0: it was asked to stop (Ctrl-C reaches the whole group)
                        log.warning("worker %d exited with status %s; starting another", w.pid, w.returncode)
                        self.procs[i] = start_workers(self.settings, 1)[0]
        self.stopped.wait()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
        stop_workers(self.procs)
        self.stopped.set()
        self.thread.join()


def serve(settings: ServiceSettings, *, host: str, port: int, workers: int) -> int:
    import uvicorn

    from tuneforge.service.app import create_app

    ctx = ServiceContext.open(settings)  # migrations run once, here, before anything else starts
    app = create_app(settings, ctx)
    pool = WorkerPool(settings, workers)
    print(f"tuneforge serve: http://{host}:{port}/v1 ({workers} worker(s), data in {settings.data_dir}, "
          f"database {'PostgreSQL' if not ctx.store.sqlite else 'SQLite'}); Ctrl-C stops", file=sys.stderr, flush=True)
    # What is loaded by now (torch, FastAPI, SQLAlchemy: ~250k objects) lives as long as the process. Frozen, it is
    # out of the cyclic collector's sight: a full collection no longer stalls every request for 150-550 ms.
    gc.collect()
    gc.freeze()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")  # handles SIGINT/SIGTERM itself
    finally:
        pool.stop()
        ctx.store.dispose()
    return 0
