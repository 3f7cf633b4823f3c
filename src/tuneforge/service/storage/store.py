"""Every database operation of the service, in one place, by name (as procrastinate keeps its queries).

SQLite (the embedded default) runs in WAL mode; every writing transaction starts with BEGIN IMMEDIATE, so
writers are serialised and a claim cannot race another. PostgreSQL claims with FOR UPDATE SKIP LOCKED.
Every status change is a compare-and-swap (`UPDATE ... WHERE status IN (...)`), and a worker's updates
also require `worker_id` to still be its own, so a job reaches one terminal state exactly once.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import and_, create_engine, delete, event, func, insert, or_, select, update
from sqlalchemy.engine import Engine

from tuneforge.service.storage.schema import (api_keys, checkpoints, files, idempotency, job_events, jobs, metadata,
                                              models, orgs)

ACTIVE = ("validating_files", "queued", "running", "paused")
TERMINAL = ("succeeded", "failed", "cancelled")


def now() -> int:
    return int(time.time())


# PostgreSQL text cannot hold NUL (psycopg refuses the query), SQLite can. Clients can send it anywhere (a path
# parameter `file-a%00`, a cursor, a role name quoted in a validation message), so the Store makes both
# databases behave alike: a lookup by a value with NUL finds nothing, and free text is stored with it replaced.
NUL = "\x00"


def _findable(*values: str | None) -> bool:
    """False when a key cannot name a stored row: no id, name or cursor this service issues holds NUL."""
    return not any(value is not None and NUL in value for value in values)


def storable_text(text: str) -> str:
    """Free text (a file name, an event message) as both databases store it."""
    return text.replace(NUL, "\ufffd")


# Connections kept open per engine: as many as the API's threadpool uses at once. Beyond `pool_size` every
# checkout opens and closes a connection (on SQLite re-running the PRAGMAs below), which under 16 concurrent
# readers cost more CPU than the queries themselves.
POOL = {"pool_size": 20, "max_overflow": 20}


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **POOL)

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (pysqlite's own handling is lazy)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    if immediate:  # the writer: every transaction takes the write lock at once, so writers queue, never deadlock
        @event.listens_for(engine, "begin")
        def on_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    # The reader issues no BEGIN: each of its statements runs on its own snapshot (every `read()` block is one
    # statement), and a BEGIN + ROLLBACK around each one doubled the work of a read.

    return engine


class Store:
    def __init__(self, url: str):
        self.url = url
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.writer = _sqlite_engine(url, immediate=True)
            self.reader = _sqlite_engine(url, immediate=False)
        else:
            url = url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url
            self.writer = self.reader = create_engine(url, pool_pre_ping=True, **POOL)

    # ---------------------------------------------------------------- plumbing

    @contextmanager
    def write(self):
        with self.writer.begin() as conn:
            yield conn

    @contextmanager
    def read(self):
        with self.reader.connect() as conn:
            yield conn

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent; safe with several processes)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        cfg.attributes["engine"] = self.writer
        command.upgrade(cfg, "head")

    def dispose(self) -> None:
        self.writer.dispose()
        if self.reader is not self.writer:
            self.reader.dispose()

    def _insert_ignore(self, table):
        if self.sqlite:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        return dialect_insert(table).on_conflict_do_nothing()

    # ---------------------------------------------------------------- orgs and keys

    def create_org(self, org_id: str, name: str) -> dict:
        with self.write() as c:
            row = c.execute(select(orgs).where(orgs.c.name == name)).mappings().first()
            if row:
                return dict(row)
            c.execute(insert(orgs).values(id=org_id, name=name, created_at=now()))
            return {"id": org_id, "name": name}

    def get_org(self, org_id: str) -> dict | None:
        with self.read() as c:
            row = c.execute(select(orgs).where(orgs.c.id == org_id)).mappings().first()
            return dict(row) if row else None

    def add_key(self, key_id: str, org_id: str, prefix: str, digest: str) -> None:
        with self.write() as c:
            c.execute(insert(api_keys).values(id=key_id, org_id=org_id, prefix=prefix, digest=digest, created_at=now()))

    def key_by_prefix(self, prefix: str) -> dict | None:
        with self.read() as c:
            row = c.execute(select(api_keys.c.digest, api_keys.c.org_id, orgs.c.name.label("org_name"))
                            .join(orgs, orgs.c.id == api_keys.c.org_id)
                            .where(api_keys.c.prefix == prefix)).mappings().first()
            return dict(row) if row else None

    # ---------------------------------------------------------------- files

    def insert_file(self, row: dict) -> None:
        with self.write() as c:
            c.execute(insert(files).values(**{**row, "filename": storable_text(row["filename"])}))

    def insert_file_once(self, row: dict) -> bool:
        """Insert unless a file with this id exists (a result file written again after a crash)."""
        with self.write() as c:
            return c.execute(self._insert_ignore(files).values(**row).returning(files.c.id)).first() is not None

    def get_file(self, org_id: str, file_id: str) -> dict | None:
        if not _findable(file_id):
            return None
        with self.read() as c:
            row = c.execute(select(files).where(files.c.id == file_id, files.c.org_id == org_id)).mappings().first()
            return dict(row) if row else None

    def list_files(self, org_id: str, *, purpose: str | None, limit: int, order: str, after: str | None):
        q = select(files).where(files.c.org_id == org_id)
        if purpose:
            if not _findable(purpose):
                return [], False
            q = q.where(files.c.purpose == purpose)
        return self._page(files, q, limit, order, after, org_id)

    def files_in_use(self, org_id: str, file_id: str) -> list[str]:
        """Unfinished jobs that read this file."""
        with self.read() as c:
            return list(c.execute(select(jobs.c.id).where(
                jobs.c.org_id == org_id, jobs.c.status.in_(ACTIVE),
                or_(jobs.c.training_file == file_id, jobs.c.validation_file == file_id))).scalars())

    def delete_file(self, org_id: str, file_id: str) -> bool:
        with self.write() as c:
            return c.execute(delete(files).where(files.c.id == file_id, files.c.org_id == org_id)).rowcount == 1

    # ---------------------------------------------------------------- jobs

    def insert_job(self, row: dict) -> None:
        with self.write() as c:
            c.execute(insert(jobs).values(**row))

    def get_job(self, job_id: str, org_id: str | None = None) -> dict | None:
        if not _findable(job_id):
            return None
        q = select(jobs).where(jobs.c.id == job_id)
        if org_id is not None:
            q = q.where(jobs.c.org_id == org_id)
        with self.read() as c:
            row = c.execute(q).mappings().first()
            return dict(row) if row else None

    def list_jobs(self, org_id: str, *, limit: int, after: str | None, meta: dict[str, str]):
        q = select(jobs).where(jobs.c.org_id == org_id)
        rows, has_more = self._page(jobs, q, limit if not meta else 10**9, "desc", after, org_id)
        if meta:  # JSON filtering differs per database: filter here (per-org job counts are small)
            rows = [r for r in rows if all((r["metadata"] or {}).get(k) == v for k, v in meta.items())]
            has_more = len(rows) > limit
            rows = rows[:limit]
        return rows, has_more

    def count_active_jobs(self, org_id: str) -> int:
        with self.read() as c:
            return c.execute(select(func.count()).select_from(jobs).where(
                jobs.c.org_id == org_id, jobs.c.status.in_(("validating_files", "queued", "running")))).scalar_one()

    def set_status(self, job_id: str, from_status: tuple[str, ...], to_status: str, event: dict | None = None,
                   **fields) -> bool:
        """Compare-and-swap a job's status; True if this call made the change. `event` is recorded in the same
        transaction, so a client never sees the new status without the event that explains it."""
        with self.write() as c:
            done = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(from_status))
                             .values(status=to_status, **fields)).rowcount == 1
            return self._with_event(c, done, event)

    def request_stop(self, org_id: str, job_id: str, what: str, events: dict[str, dict] | None = None) -> str | None:
        """Cancel or pause: a queued job changes at once, a running one is marked for its worker. Returns the
        job's status afterwards (None: no such job); `events[status]` is recorded with the change."""
        target = "cancelled" if what == "cancel" else "paused"
        events = events or {}
        with self.write() as c:
            row = c.execute(select(jobs.c.status).where(jobs.c.id == job_id, jobs.c.org_id == org_id)).first()
            if row is None:
                return None
            status = row[0]
            if status in ("validating_files", "queued") or (status == "paused" and what == "cancel"):
                values = {"status": target, "requested": None, "estimated_finish": None}
                if target == "cancelled":
                    values["finished_at"] = now()
                done = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == status).values(**values))
                self._with_event(c, done.rowcount == 1, events.get(target))
                return target
            if status == "running":
                done = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "running",
                                                    or_(jobs.c.requested.is_(None), jobs.c.requested == "pause"))
                                 .values(requested=what))
                self._with_event(c, done.rowcount == 1, events.get("running"))
            return status

    def resume_job(self, org_id: str, job_id: str, event: dict | None = None) -> bool:
        """paused -> queued (compare-and-swap); False when the job is not paused (or not this org's)."""
        with self.write() as c:
            done = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.org_id == org_id, jobs.c.status == "paused")
                             .values(status="queued", requested=None, attempts=0)).rowcount == 1
            return self._with_event(c, done, event)

    def has_queued_job(self) -> bool:
        with self.read() as c:
            return c.execute(select(jobs.c.id).where(jobs.c.status == "queued").limit(1)).first() is not None

    def claim_next_job(self, worker_id: str, max_running_per_org: int | None = None) -> dict | None:
        """Atomically take the next queued job: status running, this worker, a fresh heartbeat.

        Fair between orgs: the oldest queued job of the org with the fewest jobs running, so one org's queue of
        jobs cannot hold every worker while another org waits; with `max_running_per_org`, an org already
        running that many is skipped."""
        r = jobs.alias("r")
        running = (select(func.count()).select_from(r).where(r.c.org_id == jobs.c.org_id, r.c.status == "running")
                   .correlate(jobs).scalar_subquery())
        with self.write() as c:
            q = select(jobs.c.id).where(jobs.c.status == "queued")
            if max_running_per_org is not None:
                q = q.where(running < max_running_per_org)
            q = q.order_by(running, jobs.c.seq).limit(1)
            if not self.sqlite:
                q = q.with_for_update(skip_locked=True)
            job_id = c.execute(q).scalar()
            if job_id is None:
                return None
            t = time.time()
            values = {"status": "running", "worker_id": worker_id, "heartbeat_at": t, "requested": None}
            done = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "queued").values(**values))
            if done.rowcount != 1:
                return None
            c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.started_at.is_(None)).values(started_at=int(t)))
            return dict(c.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one())

    def heartbeat(self, job_id: str, worker_id: str, **fields) -> dict | None:
        """Mark the job alive; return its (status, requested), or None if this worker no longer holds it."""
        with self.write() as c:
            done = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.worker_id == worker_id,
                                                jobs.c.status == "running")
                             .values(heartbeat_at=time.time(), **fields))
            if done.rowcount != 1:
                return None
            return dict(c.execute(select(jobs.c.status, jobs.c.requested).where(jobs.c.id == job_id)).mappings().one())

    def finish_attempt(self, job_id: str, worker_id: str, to_status: str, event: dict | None = None,
                       **fields) -> bool:
        """The worker's last word on its attempt: CAS running (held by this worker) -> to_status, with its event."""
        with self.write() as c:
            done = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.worker_id == worker_id,
                                                jobs.c.status == "running")
                             .values(status=to_status, worker_id=None, **fields)).rowcount == 1
            return self._with_event(c, done, event)

    def stale_running_jobs(self, older_than: float) -> list[dict]:
        with self.read() as c:
            return [dict(r) for r in c.execute(select(jobs).where(
                jobs.c.status == "running", or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < older_than)))
                .mappings()]

    def reclaim(self, job_id: str, heartbeat_before: float, to_status: str, event: dict | None = None,
                **fields) -> bool:
        """CAS a job whose worker went silent back to `to_status` (queued, or cancelled/paused if asked)."""
        with self.write() as c:
            done = c.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "running",
                                                or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < heartbeat_before))
                             .values(status=to_status, worker_id=None, **fields)).rowcount == 1
            return self._with_event(c, done, event)

    def _with_event(self, c, done: bool, event: dict | None) -> bool:
        if done and event is not None:
            c.execute(self._insert_ignore(job_events).values(**{**event, "message": storable_text(event["message"])}))
        return done

    def stale_validating_jobs(self, created_before: int) -> list[dict]:
        with self.read() as c:
            return [dict(r) for r in c.execute(select(jobs).where(
                jobs.c.status == "validating_files", jobs.c.created_at < created_before)).mappings()]

    def update_job(self, job_id: str, **fields) -> None:
        with self.write() as c:
            c.execute(update(jobs).where(jobs.c.id == job_id).values(**fields))

    # ---------------------------------------------------------------- events and checkpoints

    def add_event(self, row: dict) -> bool:
        """Insert an event unless one with the same (job, dedup) exists; True if inserted."""
        row = {**row, "message": storable_text(row["message"])}
        with self.write() as c:
            # RETURNING, not rowcount: psycopg reports -1 rows for INSERT ... ON CONFLICT DO NOTHING
            return c.execute(self._insert_ignore(job_events).values(**row).returning(job_events.c.id)).first() is not None

    def list_events(self, job_id: str, *, limit: int, after: str | None):
        return self._page(job_events, select(job_events).where(job_events.c.job_id == job_id), limit, "desc", after,
                          None, scope=job_events.c.job_id == job_id)

    def count_events(self, job_id: str, dedup_prefix: str | None = None) -> int:
        q = select(func.count()).select_from(job_events).where(job_events.c.job_id == job_id)
        if dedup_prefix:
            q = q.where(job_events.c.dedup.startswith(dedup_prefix))
        with self.read() as c:
            return c.execute(q).scalar_one()

    def upsert_checkpoint(self, row: dict) -> None:
        with self.write() as c:
            c.execute(self._insert_ignore(checkpoints).values(**row))
            c.execute(update(checkpoints).where(checkpoints.c.job_id == row["job_id"], checkpoints.c.step == row["step"])
                      .values(metrics=row["metrics"]))

    def keep_checkpoints(self, job_id: str, steps: list[int]) -> None:
        """Forget checkpoints the run pruned from disk."""
        with self.write() as c:
            c.execute(delete(checkpoints).where(checkpoints.c.job_id == job_id, checkpoints.c.step.not_in(steps or [-1])))

    def list_checkpoints(self, job_id: str, *, limit: int, after: str | None):
        return self._page(checkpoints, select(checkpoints).where(checkpoints.c.job_id == job_id), limit, "desc", after,
                          None, scope=checkpoints.c.job_id == job_id)

    def get_checkpoint_by_model(self, model_name: str, org_id: str) -> dict | None:
        if not _findable(model_name):
            return None
        with self.read() as c:
            row = c.execute(select(checkpoints).where(checkpoints.c.model_name == model_name,
                                                      checkpoints.c.org_id == org_id)).mappings().first()
            return dict(row) if row else None

    # ---------------------------------------------------------------- models

    def insert_model(self, row: dict) -> None:
        with self.write() as c:
            c.execute(self._insert_ignore(models).values(**row))

    def get_model(self, model_id: str, org_id: str) -> dict | None:
        if not _findable(model_id):
            return None
        with self.read() as c:
            row = c.execute(select(models).where(models.c.id == model_id, models.c.org_id == org_id)).mappings().first()
            return dict(row) if row else None

    def list_models(self, org_id: str) -> list[dict]:
        with self.read() as c:
            return [dict(r) for r in c.execute(select(models).where(models.c.org_id == org_id).order_by(models.c.seq))
                    .mappings()]

    def delete_model(self, model_id: str, org_id: str) -> bool:
        with self.write() as c:
            return c.execute(delete(models).where(models.c.id == model_id, models.c.org_id == org_id)).rowcount == 1

    # ---------------------------------------------------------------- idempotency keys

    def idempotency_begin(self, org_id: str, endpoint: str, key: str, request_hash: str,
                          abandon_after: float = 300.0) -> tuple[str, dict | None]:
        """("new", None) when this request should run; ("replay", row) with the stored answer; ("in_flight",
        row) while the first is running; ("mismatch", row) when the same key came with another payload."""
        pk = and_(idempotency.c.org_id == org_id, idempotency.c.endpoint == endpoint, idempotency.c.key == key)
        with self.write() as c:
            row = c.execute(select(idempotency).where(pk)).mappings().first()
            if row is None:
                c.execute(insert(idempotency).values(org_id=org_id, endpoint=endpoint, key=key,
                                                     request_hash=request_hash, state="in_flight",
                                                     created_at=time.time()))
                return "new", None
            row = dict(row)
            if row["request_hash"] != request_hash:
                return "mismatch", row
            if row["state"] == "done":
                return "replay", row
            if time.time() - row["created_at"] > abandon_after:  # the first attempt died mid-request
                c.execute(update(idempotency).where(pk).values(created_at=time.time()))
                return "new", None
            return "in_flight", row

    def idempotency_finish(self, org_id: str, endpoint: str, key: str, status_code: int, body: str) -> None:
        pk = and_(idempotency.c.org_id == org_id, idempotency.c.endpoint == endpoint, idempotency.c.key == key)
        with self.write() as c:
            if status_code >= 500:  # not an answer worth replaying: let a retry run again
                c.execute(delete(idempotency).where(pk))
            else:
                c.execute(update(idempotency).where(pk).values(state="done", status_code=status_code, body=body))

    # ---------------------------------------------------------------- pagination

    def _page(self, table, query, limit: int, order: str, after: str | None, org_id: str | None, scope=None):
        """(rows, has_more) after the object `after` (by seq), newest first for order=desc."""
        if after:
            if not _findable(after):
                return None, False
            cond = table.c.id == after
            if org_id is not None and "org_id" in table.c:
                cond = and_(cond, table.c.org_id == org_id)
            if scope is not None:
                cond = and_(cond, scope)
            with self.read() as c:
                seq = c.execute(select(table.c.seq).where(cond)).scalar()
            if seq is None:
                return None, False  # the caller answers 400/404 for an unknown cursor
            query = query.where(table.c.seq < seq if order == "desc" else table.c.seq > seq)
        query = query.order_by(table.c.seq.desc() if order == "desc" else table.c.seq.asc()).limit(limit + 1)
        with self.read() as c:
            rows = [dict(r) for r in c.execute(query).mappings()]
        return rows[:limit], len(rows) > limit


__all__ = ["Store", "ACTIVE", "TERMINAL", "metadata", "now", "storable_text"]
