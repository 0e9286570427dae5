"""Alembic environment: runs the node's migrations against the configured URL."""

from typing import Any

from alembic import context
from sqlalchemy import Connection, Engine, create_engine, event, pool

from db.models import Base

config = context.config
target_metadata = Base.metadata


def _transactional_ddl(engine: Engine) -> None:
    """Run SQLite's migrations in one real transaction, as SQLAlchemy documents for pysqlite.

    The driver opens a transaction only before INSERT, UPDATE or DELETE: each ADD COLUMN or CREATE TABLE before
    the first of them would be committed on its own, and an upgrade stopped part-way (killed, power cut, disk
    full) would leave columns that its next try adds again and fails on, while ``alembic_version`` names the old
    revision. With the driver's own transaction handling off and an explicit BEGIN IMMEDIATE, the whole upgrade
    is committed at once or not at all."""

    @event.listens_for(engine, "connect")
    def _driver_leaves_transactions_to_us(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediately(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("the migration configuration names no database (sqlalchemy.url)")
    engine = create_engine(url, poolclass=pool.NullPool)
    if engine.dialect.name == "sqlite":
        _transactional_ddl(engine)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
