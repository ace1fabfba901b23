"""Core statements compiled once for a dialect and run on the database driver's own cursor.

The worker protocol's transactions (lease, report, finish) are a few small statements each, and on
them SQLAlchemy's per-execution work (statement cache lookup, parameter and result processing,
events, the pooled connection's transaction bookkeeping) costs several times the SQL itself: on the
2-core test machine a lease took about 1.3 ms of CPU through a Core connection and 0.3 ms here. The
SQL is still SQLAlchemy's: each statement is written in Core and compiled here for the engine's
dialect; only the execution is direct. Values must therefore already be what the driver takes (str,
int, float, None: no bind processors run), and rows come back as the driver returns them.
"""

from __future__ import annotations

import threading
import time
from collections import namedtuple
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Dialect, Engine
from sqlalchemy.sql.expression import Executable, Select


@dataclass(frozen=True)
class Compiled:
    """One statement's SQL text for one dialect, with named parameters (``:name`` or ``%(name)s``),
    so that a mapping of values binds as it is."""

    sql: str
    #: Values fixed in the statement itself (literals such as a state, LIMIT 1).
    defaults: Mapping[str, Any]
    #: Row type of a SELECT (its column keys as fields), None for other statements.
    row: type | None

    def bind(self, values: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**self.defaults, **values} if self.defaults else values


def compile_for(statement: Executable, dialect: Dialect) -> Compiled:
    """Compile ``statement`` (whose parameters are ``bindparam``s or literals) for ``dialect``'s driver.

    A dialect with positional parameters (SQLite's ``?``) is replaced by one of its class with named
    ones, which its driver takes as well: values then need no reordering on every execution."""
    if dialect.positional:
        dialect = type(dialect)(paramstyle="named")
    compiled = statement.compile(dialect=dialect)
    defaults = {name: value for name, value in compiled.params.items() if not compiled.binds[name].required}
    row = None
    if isinstance(statement, Select):
        row = namedtuple("Row", [column.key for column in statement.selected_columns], rename=True)  # type: ignore[misc]
    return Compiled(compiled.string, defaults, row)


class DirectCursor:
    """A driver cursor inside a transaction, taking :class:`Compiled` statements."""

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    def execute(self, statement: Compiled, **values: Any) -> int:
        """Run a statement; the number of rows it changed."""
        self.cursor.execute(statement.sql, statement.bind(values))
        return self.cursor.rowcount

    def execute_many(self, statement: Compiled, rows: Sequence[Mapping[str, Any]]) -> None:
        self.cursor.executemany(statement.sql, [statement.bind(values) for values in rows])

    def first(self, statement: Compiled, **values: Any) -> Any:
        """The first row of a SELECT (as its row type), or None."""
        self.cursor.execute(statement.sql, statement.bind(values))
        row = self.cursor.fetchone()
        return None if row is None or statement.row is None else statement.row(*row)

    def all(self, statement: Compiled, **values: Any) -> list[Any]:
        self.cursor.execute(statement.sql, statement.bind(values))
        make = statement.row
        return [make(*row) for row in self.cursor.fetchall()] if make is not None else []

    def scalar(self, statement: Compiled, **values: Any) -> Any:
        """The first column of the first row, or None."""
        self.cursor.execute(statement.sql, statement.bind(values))
        row = self.cursor.fetchone()
        return None if row is None else row[0]


class KeptConnection:
    """One pooled driver connection kept checked out from one direct transaction to the next.

    Direct transactions come mostly one at a time (group commit writes one batch at a time), and a
    checkout per transaction cost more than the batch's own SQL on SQLite, plus a round trip for the
    liveness ping on PostgreSQL. A caller that finds the kept connection in use gets a pooled one as
    usual. A connection idle for longer than ``idle_limit`` seconds goes back to the pool, so the next
    checkout pings it again: a server restart or idle timeout costs no request an error."""

    def __init__(self, engine: Engine, idle_limit: float) -> None:
        self.engine = engine
        self.idle_limit = idle_limit
        self._lock = threading.Lock()
        self._kept: Any = None
        self._used_at = 0.0

    @contextmanager
    def borrow(self) -> Iterator[Any]:
        """A pooled connection (SQLAlchemy's proxy of the driver's) for one transaction."""
        if not self._lock.acquire(blocking=False):
            pooled = self.engine.raw_connection()
            try:
                yield pooled
            finally:
                pooled.close()
            return
        try:
            if self._kept is not None and time.monotonic() - self._used_at > self.idle_limit:
                self._give_back()
            if self._kept is None:
                self._kept = self.engine.raw_connection()
            yield self._kept
            self._used_at = time.monotonic()
        except BaseException:
            self._give_back()  # after a failure start afresh: the pool checks (or replaces) the connection
            raise
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._give_back()

    def _give_back(self) -> None:
        if self._kept is not None:
            kept, self._kept = self._kept, None
            kept.close()
