"""Core statements run on the driver's cursor, and the connection kept between direct transactions, on a
real SQLite database."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, bindparam, create_engine, select, update

from orchestrator.storage.direct import DirectCursor, KeptConnection, compile_for
from orchestrator.storage.models import StudyRow

IDLE_LIMIT_S = 0.05


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'direct.db'}")
    StudyRow.__table__.create(engine)
    with engine.begin() as conn:
        conn.execute(StudyRow.__table__.insert(), [
            {"owner": owner, "name": None, "task_json": "{}", "state": "running", "max_points": 3,
             "max_evaluation_jobs": 6, "max_attempts": 1, "lease_seconds": 60.0, "direction": "minimize",
             "n_points": 0, "evaluation_jobs": 0, "created_at": 0.0, "updated_at": 0.0}
            for owner in ("alice", "bob")])
    yield engine
    engine.dispose()


def test_statements_bind_named_values_and_their_own_literals(engine: Engine) -> None:
    studies = StudyRow.__table__.c
    owners = compile_for(select(studies.id, studies.owner).where(studies.state == "running")
                         .order_by(studies.id.desc()).limit(bindparam("b_limit")), engine.dialect)
    bump = compile_for(update(StudyRow.__table__).where(studies.owner == bindparam("b_owner"))
                       .values(n_points=studies.n_points + bindparam("b_added")), engine.dialect)
    assert ":b_limit" in owners.sql and owners.defaults == {"state_1": "running", "param_1": 0}
    raw = engine.raw_connection()
    try:
        cursor = DirectCursor(raw.cursor())
        assert [row.owner for row in cursor.all(owners, b_limit=2)] == ["bob", "alice"]
        assert cursor.execute(bump, b_owner="alice", b_added=2) == 1
        assert cursor.first(owners, b_limit=1).owner == "bob"
        assert cursor.scalar(compile_for(select(studies.n_points).where(studies.owner == "alice"),
                                         engine.dialect)) == 2
        with pytest.raises(engine.dialect.loaded_dbapi.ProgrammingError, match="b_added"):
            cursor.execute(bump, b_owner="alice")  # a value the statement needs is missing
    finally:
        raw.close()


def test_the_kept_connection_is_reused_shared_only_when_free_and_renewed(engine: Engine) -> None:
    kept = KeptConnection(engine, IDLE_LIMIT_S)
    try:
        with kept.borrow() as first:
            first_driver = first.dbapi_connection
            with kept.borrow() as meanwhile:
                assert meanwhile.dbapi_connection is not first_driver, "a busy kept connection is not shared"
        with kept.borrow() as again:
            assert again.dbapi_connection is first_driver
        time.sleep(2 * IDLE_LIMIT_S)
        with kept.borrow() as after_idle:
            assert after_idle is not first, "an idle kept connection goes back to the pool first"
        with pytest.raises(RuntimeError), kept.borrow() as failing:
            failed = failing
            raise RuntimeError("transaction failed")
        with kept.borrow() as fresh:
            assert fresh is not failed
    finally:
        kept.close()
    assert engine.pool.checkedout() == 0
