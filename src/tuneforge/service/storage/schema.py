"""The service's tables (SQLAlchemy Core). The same schema on SQLite and PostgreSQL; Alembic migrations in
`migrations/versions/` create it, and a test checks that they match these definitions.

Listed objects have an integer `seq` (their order, and the cursor behind `after=`) and a public string `id`.
Every row that a client can see carries `org_id`: every query filters by it.
"""
from __future__ import annotations

from sqlalchemy import (JSON, BigInteger, Column, Float, ForeignKey, Integer, MetaData, String, Table, Text,
                        UniqueConstraint)

metadata = MetaData()

orgs = Table(
    "orgs", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", String(64), primary_key=True),
    Column("org_id", String(64), ForeignKey("orgs.id"), nullable=False),
    Column("prefix", String(32), nullable=False, unique=True),  # looked up by prefix, then compared in constant time
    Column("digest", String(128), nullable=False),  # HMAC-SHA256(pepper, key), hex
    Column("created_at", BigInteger, nullable=False),
)

files = Table(
    "files", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("org_id", String(64), ForeignKey("orgs.id"), nullable=False, index=True),
    Column("filename", String(512), nullable=False),  # as uploaded: shown back, never used as a path
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("status_details", Text),
    Column("job_id", String(64)),  # result files: the job that wrote them
)

jobs = Table(
    "jobs", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("org_id", String(64), ForeignKey("orgs.id"), nullable=False, index=True),
    Column("status", String(32), nullable=False, index=True),
    Column("model", String(256), nullable=False),
    Column("fine_tuned_model", String(512)),
    Column("training_file", String(64), nullable=False),
    Column("validation_file", String(64)),
    Column("suffix", String(64)),
    Column("seed", BigInteger, nullable=False),
    Column("metadata", JSON),
    Column("hyperparameters", JSON, nullable=False),
    Column("method", JSON, nullable=False),
    Column("spec", JSON, nullable=False),  # the resolved tuneforge JobSpec
    Column("error", JSON),
    Column("created_at", BigInteger, nullable=False),
    Column("started_at", BigInteger),
    Column("finished_at", BigInteger),
    Column("trained_tokens", BigInteger),
    Column("estimated_finish", BigInteger),
    Column("result_files", JSON, nullable=False),
    Column("requested", String(16)),  # "cancel" | "pause": asked for while running, carried out by the worker
    Column("worker_id", String(64)),
    Column("heartbeat_at", Float),
    Column("attempts", Integer, nullable=False, default=0),  # attempts since the last progress
    Column("step", Integer, nullable=False, default=0),  # newest checkpoint's step
    Column("total_steps", Integer),
)

job_events = Table(
    "job_events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("created_at", BigInteger, nullable=False),
    Column("level", String(8), nullable=False),
    Column("message", Text, nullable=False),
    Column("type", String(16), nullable=False),
    Column("data", JSON),
    Column("dedup", String(128), nullable=False),  # one event per (job, dedup): a resumed step is not logged twice
    UniqueConstraint("job_id", "dedup", name="uq_job_events_dedup"),
)

checkpoints = Table(
    "checkpoints", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("org_id", String(64), ForeignKey("orgs.id"), nullable=False),
    Column("step", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("model_name", String(512), nullable=False),  # ft:...:ckpt-step-N
    UniqueConstraint("job_id", "step", name="uq_checkpoints_step"),
)

models = Table(
    "models", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(512), nullable=False, unique=True),  # ft:{base}:{org}:{suffix}:{id8}
    Column("org_id", String(64), ForeignKey("orgs.id"), nullable=False, index=True),
    Column("job_id", String(64), nullable=False),
    Column("base", String(256), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

idempotency = Table(
    "idempotency", metadata,
    Column("org_id", String(64), primary_key=True),
    Column("endpoint", String(128), primary_key=True),
    Column("key", String(256), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # in_flight | done
    Column("status_code", Integer),
    Column("body", Text),
    Column("created_at", Float, nullable=False),
)
