"""Alembic environment: runs migrations on the engine the Store hands over (`config.attributes["engine"]`).
On PostgreSQL a transaction-level advisory lock makes concurrent starts (API and workers) take turns; on
SQLite the Store's BEGIN IMMEDIATE does the same."""
from alembic import context

from tuneforge.service.storage.schema import metadata

MIGRATION_LOCK = 7_453_001  # any constant shared by every tuneforge process


def run_migrations_online() -> None:
    engine = context.config.attributes["engine"]
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=False)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            context.run_migrations()


run_migrations_online()
