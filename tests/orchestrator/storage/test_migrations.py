"""The Alembic migrations build exactly the schema the models describe, on every backend, and
opening a storage (which migrates) is safe to do many times and from many places at once."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from orchestrator.storage.models import Base
from orchestrator.storage.sql import SQLStorage, head_revision

CONCURRENT_OPENERS = 6
HOT_PATH_INDEXES = {
    "points": {("study_id", "state", "number"), ("state", "lease_expires_at")},
    "leases": {("point_id",)},
}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with no tables at all (PostgreSQL: a freshly created one)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return request.getfixturevalue("postgres_url")


def test_migrated_schema_equals_the_models(empty_url: str) -> None:
    with SQLStorage(empty_url) as storage, storage.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []
        assert MigrationContext.configure(conn).get_current_revision() == head_revision() == "0001"


def test_hot_path_indexes_exist(empty_url: str) -> None:
    with SQLStorage(empty_url) as storage, storage.engine.connect() as conn:
        inspector = inspect(conn)
        for table, wanted in HOT_PATH_INDEXES.items():
            have = {tuple(ix["column_names"]) for ix in inspector.get_indexes(table)}
            assert wanted <= have, table
        open_lease = [ix for ix in inspector.get_indexes("leases") if ix["name"] == "uq_leases_open_point_id"]
        assert open_lease and open_lease[0]["unique"]
        unique = {tuple(c["column_names"]) for c in inspector.get_unique_constraints("points")}
        assert ("finish_request_id",) in unique


def test_reopening_keeps_data(empty_url: str) -> None:
    with SQLStorage(empty_url) as storage:
        token = storage.create_token("alice")
    with SQLStorage(empty_url) as storage:
        assert storage.verify_token(token) is not None


def test_many_threads_open_a_fresh_database_at_once(empty_url: str) -> None:
    def open_and_close(_: int) -> str:
        with SQLStorage(empty_url) as storage, storage.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision() or ""

    with ThreadPoolExecutor(CONCURRENT_OPENERS) as pool:
        assert set(pool.map(open_and_close, range(CONCURRENT_OPENERS))) == {head_revision()}


def _open_in_child(url: str) -> bool:
    SQLStorage(url).close()
    return True


def test_many_processes_open_a_fresh_sqlite_file_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with multiprocessing.get_context("fork").Pool(CONCURRENT_OPENERS) as pool:
        assert all(pool.map(_open_in_child, [url] * CONCURRENT_OPENERS))
    with SQLStorage(url) as storage, storage.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head_revision()


def test_unsupported_database_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported database"):
        SQLStorage("mysql://localhost/hepopt")
