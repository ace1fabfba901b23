"""Group commit: concurrent callers' small writes go to the database together, in one transaction.

Under load most of a small write's cost is the transaction around it (pool checkout, BEGIN, COMMIT,
the SQLite write lock handed from thread to thread). Callers that arrive while a batch is being written
queue up; when it is done, the next batch is written with everything queued so far. Every caller returns
only after the transaction holding its item committed (or raises that item's own error), so answers stay
durable; a caller waits for at most the batch in progress and its own, never for a queue of transactions.

Two kinds of caller share one queue. A thread (:meth:`GroupCommit.submit`) sleeps on a lock of its own
and is woken once, when its item is done or when it is its turn to write the next batch: waking every
waiter at the end of every batch (a shared condition) cost more CPU than the batch itself with a few
dozen callers. A coroutine (:meth:`GroupCommit.submit_async`) cannot write without blocking its event
loop, so a batch whose first item is a coroutine's is written by the group's own writer thread, and a
batch's coroutines are woken together, by one callback per event loop: a server's requests then cost
no thread of their own and no thread switch each.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from orchestrator.loop_threads import settle

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
    #: A thread's: released to wake it, when its item is done or it is to write the next batch.
    wake: Any = field(default=None, repr=False)
    #: A coroutine's: resolved on its event loop when its item is done.
    future: asyncio.Future[Any] | None = field(default=None, repr=False)


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
    #: The writer thread of batches that a coroutine's item heads, started on first need.
    _writer: threading.Thread | None = None
    _writer_turns: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    #: The writer thread is to write the next batch (its wake-ups also come from :meth:`close`).
    _writer_turn: bool = False
    _closed: bool = False

    def submit(self, item: T) -> Any:
        """Return ``item``'s result once it is committed; raise its error if it was refused."""
        pending = Pending(item, wake=_held_lock())
        if not self._enqueue(pending):
            pending.wake.acquire()
        if not pending.done:  # its turn to write: the queue holds this caller's own item
            self._write_queued()
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def submit_async(self, item: T) -> Any:
        """:meth:`submit` for a coroutine, which waits without a thread of its own."""
        pending = Pending(item, future=asyncio.get_running_loop().create_future())
        self._enqueue(pending)
        return await pending.future  # type: ignore[misc]

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
                    self._hand_over()

    def close(self) -> None:
        """Stop the writer thread once it has written the batch it was given, if any."""
        with self._lock:
            self._closed = True
            writer = self._writer
        self._writer_turns.release()
        if writer is not None and writer is not threading.current_thread():
            writer.join()

    def _enqueue(self, pending: Pending[T]) -> bool:
        """Queue ``pending``; True when its thread is to write the batch now (nobody else is writing).
        A coroutine's item that nobody is writing for goes to the writer thread at once."""
        with self._lock:
            self._queue.append(pending)
            writes = not (self._writing or self._held)
            if writes:
                self._writing = True
                if pending.future is not None:
                    self._wake_writer()
        return writes

    def _hand_over(self) -> None:
        """Wake the next batch's writer: the thread whose item heads the queue, else the writer thread.
        Called with the lock held, ``_writing`` set and the queue not empty."""
        head = self._queue[0]
        if head.wake is not None:
            head.wake.release()
        else:
            self._wake_writer()

    def _wake_writer(self) -> None:
        """Give the writer thread the next batch (called with the lock held)."""
        self._writer_turn = True
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_for_coroutines, name="hepopt-group-commit",
                                            daemon=True)
            self._writer.start()
        self._writer_turns.release()

    def _write_for_coroutines(self) -> None:
        while True:
            self._writer_turns.acquire()
            with self._lock:
                turn, self._writer_turn = self._writer_turn, False
                if not turn and self._closed:
                    self._writer = None
                    return
            if turn:
                self._write_queued()

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
            _wake_callers(batch)
            with self._lock:
                self._writing = bool(self._queue) and not self._held
                if self._writing:
                    self._hand_over()


def _wake_callers(batch: list[Pending[Any]]) -> None:
    """Mark the batch done: each thread is woken, and each event loop once for all its coroutines."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Pending[Any]]] = {}
    for pending in batch:
        pending.done = True
        if pending.future is not None:
            by_loop.setdefault(pending.future.get_loop(), []).append(pending)
        elif pending.wake.locked():  # only the writer releases, so this check cannot race
            pending.wake.release()
    for loop, waiting in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(_settle_all, waiting)


def _settle_all(batch: list[Pending[Any]]) -> None:
    for pending in batch:
        settle(pending.future, pending.error if pending.error is not None else pending.result,  # type: ignore[arg-type]
               pending.error is not None)
