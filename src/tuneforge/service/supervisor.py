"""`tuneforge serve`: the API (uvicorn, in this process) and N worker processes, stopped together on
Ctrl-C / SIGTERM. Workers finish their current step and checkpoint before they exit; jobs they held are
requeued and resume at the next start."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from tuneforge.service.context import ServiceContext
from tuneforge.service.settings import ServiceSettings

log = logging.getLogger("tuneforge.service")
WORKER_STOP_SECONDS = 120


def start_workers(settings: ServiceSettings, n: int) -> list[subprocess.Popen]:
    from tuneforge.service.worker import die_with_parent

    env = {**os.environ, **settings.to_env()}
    return [subprocess.Popen([sys.executable, "-m", "tuneforge.service.worker"], env=env, preexec_fn=die_with_parent)
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


def serve(settings: ServiceSettings, *, host: str, port: int, workers: int) -> int:
    import uvicorn

    from tuneforge.service.app import create_app

    ctx = ServiceContext.open(settings)  # migrations run once, here, before anything else starts
    app = create_app(settings, ctx)
    procs = start_workers(settings, workers)
    print(f"tuneforge serve: http://{host}:{port}/v1 ({workers} worker(s), data in {settings.data_dir}, "
          f"database {'PostgreSQL' if not ctx.store.sqlite else 'SQLite'}); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")  # handles SIGINT/SIGTERM itself
    finally:
        stop_workers(procs)
        ctx.store.dispose()
    return 0
