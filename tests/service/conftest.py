"""A real `tuneforge serve` (uvicorn + workers, subprocesses) per test module, on SQLite and on PostgreSQL,
driven with the official openai SDK in strict mode.

PostgreSQL: TUNEFORGE_TEST_POSTGRES (an admin-ish URL whose role may CREATE DATABASE; `.ci/run` sets it
and starts the server). Each server gets a database of its own, dropped afterwards. Without the variable,
a local server at postgresql://tuneforge:tuneforge@127.0.0.1:5432/postgres is tried and the PostgreSQL
cases are skipped when there is none; with it set, an unreachable server is an error.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import CHAT_RECORDS

PG_ENV = "TUNEFORGE_TEST_POSTGRES"
PG_DEFAULT = "postgresql://tuneforge:tuneforge@127.0.0.1:5432/postgres"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_admin_url() -> str | None:
    url = os.environ.get(PG_ENV)
    try:
        import psycopg

        with psycopg.connect(url or PG_DEFAULT, connect_timeout=3, autocommit=True):
            return url or PG_DEFAULT
    except Exception as e:  # noqa: BLE001 — no server: skip, unless CI said there is one
        if url:
            raise RuntimeError(f"{PG_ENV}={url} but PostgreSQL is unreachable: {e}") from None
        return None


def create_pg_database() -> tuple[str, str] | None:
    """(database url, name) of a new empty database, or None when no PostgreSQL is available."""
    import psycopg

    admin = _pg_admin_url()
    if admin is None:
        return None
    name = "tf_test_" + secrets.token_hex(6)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return admin.rsplit("/", 1)[0] + "/" + name, name


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(_pg_admin_url(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class Server:
    data_dir: Path
    base_model: Path
    database_url: str | None
    workers: int = 1
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    keys: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "tuneforge.cli", "serve", "--data-dir", str(self.data_dir), "--port",
               str(self.port), "--workers", str(self.workers), "--base-model", f"tiny={self.base_model}",
               "--heartbeat-seconds", "0.5", "--reclaim-after-seconds", "3", "--poll-seconds", "0.2",
               "--training-threads", "1", *self.extra]
        return cmd + (["--database-url", self.database_url] if self.database_url else [])

    def start(self) -> Server:
        log = open(self.data_dir.parent / f"serve-{self.port}.log", "ab")
        self.proc = subprocess.Popen(self.command(), env=ENV, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tuneforge serve exited with {self.proc.returncode}: "
                                   + (self.data_dir.parent / f"serve-{self.port}.log").read_text()[-3000:])
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("tuneforge serve did not start within 60 s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """Stop the whole server (its process group: API, workers, training)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def key(self, org: str) -> str:
        if org not in self.keys:
            from tuneforge.service.auth import create_key
            from tuneforge.service.context import ServiceContext
            from tuneforge.service.settings import ServiceSettings

            settings = ServiceSettings(data_dir=self.data_dir, database_url=self.database_url)
            ctx = ServiceContext.open(settings)
            self.keys[org] = create_key(ctx.store, settings.pepper(), org)
            ctx.store.dispose()
        return self.keys[org]

    def client(self, org: str = "acme", strict: bool = True, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key=self.key(org), _strict_response_validation=strict,
                      max_retries=kw.pop("max_retries", 0), **kw)

    def store(self):
        from tuneforge.service.settings import ServiceSettings
        from tuneforge.service.storage.store import Store

        return Store(ServiceSettings(data_dir=self.data_dir, database_url=self.database_url).url)


@pytest.fixture(scope="session")
def service_model(tmp_path_factory) -> Path:
    from tuneforge.models.tiny import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("service-model") / "llama")


@pytest.fixture(scope="session")
def train_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("service-data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT_RECORDS * 2))
    return path


def _server(request, tmp_path_factory, service_model, workers: int = 1):
    db = request.param
    database_url = name = None
    if db == "postgresql":
        made = create_pg_database()
        if made is None:
            pytest.skip("PostgreSQL not available here (`.ci/run` starts one and sets TUNEFORGE_TEST_POSTGRES)")
        database_url, name = made
    server = Server(tmp_path_factory.mktemp(f"service-{db}") / "data", service_model, database_url, workers=workers,
                    extra=["--max-upload-mb", "1"])
    server.start()
    yield server
    server.stop()
    if name:
        drop_pg_database(name)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory, service_model):
    yield from _server(request, tmp_path_factory, service_model)


def wait_for(client, job_id: str, statuses: tuple[str, ...], timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s (waiting for {statuses})")


def tiny_job(**training) -> dict:
    """The tuneforge extension for a few fast fp32 steps on the tiny model."""
    return {"tuneforge": {"training": {"max_steps": 4, "save_every": 2, "precision": "fp32", "max_seq_len": 128,
                                       **training}}}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A migrated Store on a fresh SQLite file or PostgreSQL database (skipped when none is reachable)."""
    from tuneforge.service.storage.store import Store

    name = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'nul.db'}"
    else:
        from tests.service.conftest import create_pg_database

        made = create_pg_database()
        if made is None:
            pytest.skip("PostgreSQL not available here")
        url, name = made
    store = Store(url)
    store.migrate()
    yield store
    store.dispose()
    if name:
        from tests.service.conftest import drop_pg_database

        drop_pg_database(name)
