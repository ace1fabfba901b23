"""Group commit: concurrent callers' small writes go to the database together, in one transaction.

Under load most of a report's cost is the transaction around its one row (pool checkout, BEGIN, COMMIT,
the SQLite write lock handed from thread to thread). Callers that arrive while a batch is being written
queue up; when it is done one of them writes everything queued so far. Every caller returns only after
the transaction holding its item committed (or raises that item's own error), so answers stay durable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Pending(Generic[T]):
    """One caller's item; the writer sets ``error`` for an item it refuses, then ``done``."""

    item: T
    error: BaseException | None = None
    done: bool = False


@dataclass
class GroupCommit(Generic[T]):
    """Writes items through ``write_batch(batch)``, which commits them in one transaction and sets
    ``error`` on the items it refuses; an exception it raises fails the whole batch."""

    write_batch: Callable[[list[Pending[T]]], None]
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _queue: list[Pending[T]] = field(default_factory=list)
    _writing: bool = False

    def submit(self, item: T) -> None:
        """Return once ``item`` is committed; raise its error if it was refused."""
        pending = Pending(item)
        with self._cond:
            self._queue.append(pending)
            while not pending.done:
                if self._writing:
                    self._cond.wait()
                else:
                    self._write_queued()
        if pending.error is not None:
            raise pending.error

    def _write_queued(self) -> None:
        """Write the queue as one batch (called holding the condition, released while writing)."""
        batch, self._queue, self._writing = self._queue, [], True
        try:
            self._cond.release()
            try:
                self.write_batch(batch)
            except BaseException as exc:
                for pending in batch:
                    pending.error = pending.error or exc
        finally:
            self._cond.acquire()
            for pending in batch:
                pending.done = True
            self._writing = False
            self._cond.notify_all()
