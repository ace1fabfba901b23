"""Alembic environment: run by :func:`orchestrator.storage.sql.upgrade` on a connection it passes in.

The caller opens the connection and the transaction (holding the backend's migration lock), so this
file only binds the metadata; there is no alembic.ini and no URL here.
"""

from __future__ import annotations

from alembic import context

from orchestrator.storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("hepopt migrations run through orchestrator.storage.sql.upgrade(), not the alembic CLI")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
