"""`tuneforge serve`: the API (uvicorn, in this process) and N worker processes, stopped together.

Stopping (what systemd, `docker stop` and Kubernetes send on every deploy, or Ctrl-C):
- the first SIGTERM or SIGINT starts a graceful stop: the API stops accepting connections and finishes the
  requests in flight, and every worker tells its training to stop at the next step boundary with a
  checkpoint, then puts the job back in the queue (status `queued`), so the next start resumes it from that
  step. Everything ends within `shutdown_grace_seconds` (settable; keep it below the orchestrator's own
  limit: Kubernetes' terminationGracePeriodSeconds is 30 s by default, `docker stop` waits 10 s unless
  given `-t`);
- when the grace period runs out, or on a second signal, the stop is immediate: each worker kills its
  training and requeues the job at its newest checkpoint (the step in flight is lost, nothing more).
A worker that dies (kill -9, out of memory, a crash) is replaced, so its job is reclaimed and resumed even
when it was the only worker.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from tuneforge.service.context import ServiceContext
from tuneforge.service.settings import ServiceSettings

log = logging.getLogger("tuneforge.service")
WORKER_CHECK_SECONDS = 1.0
HARD_STOP_SECONDS = 10.0  # after the immediate stop: how long a worker may take to requeue before SIGKILL
GRACEFUL, IMMEDIATE = signal.SIGTERM, signal.SIGUSR1  # what a worker is sent for each kind of stop


def start_workers(settings: ServiceSettings, n: int) -> list[subprocess.Popen]:
    from tuneforge.process import die_with_parent

    env = {**os.environ, **settings.to_env()}
    return [subprocess.Popen([sys.executable, "-m", "tuneforge.service.worker"], env=env,
                             preexec_fn=die_with_parent())
            for _ in range(n)]


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

    def signal(self, sig: int) -> None:
        """Send `sig` to every live worker; from now on none is replaced. Safe inside a signal handler (no lock:
        the list is only ever replaced element by element, and a worker started just now is told by `stop`)."""
        self.stopping = True
        for w in list(self.procs):
            if w.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.send_signal(sig)

    def stop(self, deadline: float) -> None:
        """Graceful stop until `deadline` (time.monotonic()), then an immediate one, then SIGKILL."""
        with self.lock:
            self.stopping = True
        self.signal(GRACEFUL)
        for sig, until in ((IMMEDIATE, deadline), (signal.SIGKILL, deadline + HARD_STOP_SECONDS)):
            for w in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.wait(timeout=max(0.0, until - time.monotonic()))
            if all(w.poll() is not None for w in self.procs):
                break
            if sig == signal.SIGKILL:
                log.error("workers still running %.0f s after the immediate stop; killing them", HARD_STOP_SECONDS)
            self.signal(sig)
        for w in self.procs:
            w.wait()
        self.stopped.set()
        self.thread.join()


class ShutdownSignals:
    """The first SIGTERM/SIGINT stops gracefully (HTTP drains, trainings checkpoint and requeue), the second at
    once. Installed for the whole of `serve`, in place of uvicorn's own handlers: those re-raise the signal
    after the HTTP shutdown, which would kill this process (and, through PR_SET_PDEATHSIG, every worker and
    training) before any training reached its checkpoint."""

    def __init__(self, pool: WorkerPool, grace_seconds: float):
        self.pool, self.grace = pool, grace_seconds
        self.server = None  # the uvicorn.Server, once made
        self.deadline: float | None = None

    def __call__(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.deadline is None:
            self.deadline = time.monotonic() + self.grace
            print(f"\ntuneforge serve: {name}: stopping; running trainings checkpoint at their next step and are "
                  f"requeued (up to {self.grace:g} s); send it again to stop at once", file=sys.stderr, flush=True)
            self.pool.signal(GRACEFUL)
        else:
            print(f"\ntuneforge serve: {name} again: stopping at once; trainings are requeued at their newest "
                  "checkpoint", file=sys.stderr, flush=True)
            self.deadline = time.monotonic()
            self.pool.signal(IMMEDIATE)
            if self.server is not None:
                self.server.force_exit = True
        if self.server is not None:
            self.server.should_exit = True


def serve(settings: ServiceSettings, *, host: str, port: int, workers: int) -> int:
    import uvicorn

    from tuneforge.service.app import create_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # our ShutdownSignals stay in place; nothing is re-raised afterwards
            yield

    ctx = ServiceContext.open(settings)  # migrations run once, here, before anything else starts
    app = create_app(settings, ctx)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_seconds)))
    pool = WorkerPool(settings, workers)
    stopping = ShutdownSignals(pool, settings.shutdown_grace_seconds)
    previous = {sig: signal.signal(sig, stopping) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = stopping.server = Server(config)
    print(f"tuneforge serve: http://{host}:{port}/v1 ({workers} worker(s), data in {settings.data_dir}, "
          f"database {'PostgreSQL' if not ctx.store.sqlite else 'SQLite'}); Ctrl-C or SIGTERM stops, keeping every "
          f"training's progress (grace {settings.shutdown_grace_seconds:g} s)", file=sys.stderr, flush=True)
    # What is loaded by now (torch, FastAPI, SQLAlchemy: ~250k objects) lives as long as the process. Frozen, it is
    # out of the cyclic collector's sight: a full collection no longer stalls every request for 150-550 ms.
    gc.collect()
    gc.freeze()
    try:
        server.run()
    finally:
        pool.stop(stopping.deadline if stopping.deadline is not None
                  else time.monotonic() + settings.shutdown_grace_seconds)
        ctx.store.dispose()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:  # the port was taken, or the app failed to start (uvicorn logged why)
        return 1
    return 0
