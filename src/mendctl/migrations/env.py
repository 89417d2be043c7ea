"""Alembic environment for the ledger schema.

mendctl runs migrations in-process: `mendctl.ledger.Ledger` builds the Alembic Config in code
and passes an open connection (already inside its transaction) in
`config.attributes["connection"]`. Without one (a developer running the `alembic` command with
migrations/alembic.ini, e.g. to autogenerate a revision) the URL in the config is used.
"""
from alembic import context
from sqlalchemy import create_engine, pool

from mendctl.ledger import Base

config = context.config
target_metadata = Base.metadata

# render_as_batch: SQLite cannot ALTER most things in place; batch mode rebuilds the table.
# Kept on for every back end: the same migration scripts run on SQLite and on PostgreSQL, where
# batch operations are plain ALTER TABLEs, so autogenerate always writes the portable form.
_OPTIONS = dict(target_metadata=target_metadata, render_as_batch=True, compare_type=True)


def run_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True,
                      dialect_opts={"paramstyle": "named"}, **_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **_OPTIONS)
        # When the caller's connection is already in a transaction, Alembic leaves it to the
        # caller to commit; otherwise this begins and commits one.
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, **_OPTIONS)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
