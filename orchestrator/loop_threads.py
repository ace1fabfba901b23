"""Threads that run blocking calls (storage transactions) for the coroutines of an asyncio server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop | None, "asyncio.Future[Any] | None"]
log = logging.getLogger(__name__)


class LoopThreads:
    """A fixed set of daemon threads, started on first use, that run blocking calls and resolve the
    caller's asyncio future directly.

    ``loop.run_in_executor`` pairs a concurrent future with an asyncio one and chains their callbacks:
    about 90 µs of the event loop's CPU per call on the test machine, most of what a worker request
    costs the loop besides parsing it. Here a call is one queue put and one ``call_soon_threadsafe``.
    """

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.size = threads
        self.name = name
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    async def run(self, call: Callable[[], T]) -> T:
        """``call()`` in one of the threads; its result, or the exception it raised."""
        if not self._threads:
            self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((call, loop, future))
        return await future

    def submit(self, call: Callable[[], Any]) -> None:
        """``call()`` in one of the threads, with nobody waiting for it; an exception it raises is logged."""
        if not self._threads:
            self._start()
        self._jobs.put((call, None, None))

    def close(self) -> None:
        """Let the threads finish the calls already queued, then stop them."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join()

    def _start(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._threads = [threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
                             for i in range(self.size)]
            for thread in self._threads:
                thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            call, loop, future = job
            try:
                outcome, failed = call(), False
            except BaseException as exc:  # handed to the awaiting coroutine, which raises it
                outcome, failed = exc, True
            if loop is None or future is None:
                if failed:
                    log.error("background call %r failed", call, exc_info=outcome)
                continue
            with contextlib.suppress(RuntimeError):  # the loop closed while the call ran: nobody waits
                loop.call_soon_threadsafe(settle, future, outcome, failed)


def settle(future: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
    """Resolve ``future`` (on its loop) with ``outcome``, raised if ``failed``, unless its waiter gave up."""
    if future.done():
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
