"""Group commit: concurrent callers' small writes go to the database together, in one transaction.

Under load most of a small write's cost is the transaction around it (pool checkout, BEGIN, COMMIT,
the SQLite write lock handed from thread to thread). Callers that arrive while a batch is being written
queue up; when it is done, the first of them writes everything queued so far. Every caller returns only
after the transaction holding its item committed (or raises that item's own error), so answers stay
durable; a caller waits for at most the batch in progress and its own, never for a queue of
transactions.

Each waiting caller sleeps on a lock of its own and is woken once, when its item is done or when it is
its turn to write: waking every waiter at the end of every batch (a shared condition) cost more CPU than
the batch itself with a few dozen callers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def _held_lock() -> Any:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass
class Pending(Generic[T]):
    """One caller's item; the writer sets its ``result`` or, for an item it refuses, ``error``."""

    item: T
    result: Any = None
    error: BaseException | None = None
    done: bool = False
    #: Released to wake the caller: its item is done, or it is to write the next batch.
    wake: Any = field(default_factory=_held_lock, repr=False)


@dataclass
class GroupCommit(Generic[T]):
    """Writes items through ``write_batch(batch)``, which commits them in one transaction, setting each
    item's ``result`` or, on the items it refuses, ``error``; an exception it raises fails the whole batch."""

    write_batch: Callable[[list[Pending[T]]], None]
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _queue: list[Pending[T]] = field(default_factory=list)
    #: A caller is writing a batch, or has been woken to write the next one.
    _writing: bool = False
    _held: bool = False

    def submit(self, item: T) -> Any:
        """Return ``item``'s result once it is committed; raise its error if it was refused."""
        pending = Pending(item)
        with self._lock:
            self._queue.append(pending)
            writes = not (self._writing or self._held)
            self._writing = self._writing or writes
        if not writes:
            pending.wake.acquire()
        if not pending.done:  # woken to write: the queue holds this caller's own item
            self._write_queued()
        if pending.error is not None:
            raise pending.error
        return pending.result

    @property
    def queued(self) -> int:
        """Items waiting for the next batch."""
        with self._lock:
            return len(self._queue)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Queue every item submitted meanwhile, to be written together when the block ends (a batch
        already in progress finishes). For maintenance, and for tests of batching."""
        with self._lock:
            self._held = True
        try:
            yield
        finally:
            with self._lock:
                self._held = False
                if not self._writing and self._queue:
                    self._writing = True
                    self._queue[0].wake.release()

    def _write_queued(self) -> None:
        """Write the queue as one batch, wake its callers, and pass the writing on to the next caller."""
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            self.write_batch(batch)
        except BaseException as exc:
            for pending in batch:
                pending.error = pending.error or exc
        finally:
            for pending in batch:
                pending.done = True
                if pending.wake.locked():  # only the writer releases, so this check cannot race
                    pending.wake.release()
            with self._lock:
                self._writing = bool(self._queue) and not self._held
                if self._writing:
                    self._queue[0].wake.release()
