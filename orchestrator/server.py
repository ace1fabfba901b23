"""Running the service: :func:`run_server` for ``hepopt serve``, :class:`EmbeddedServer` for ``hepopt run``
and tests (a real HTTP server on loopback in a background thread, so workers talk to it exactly as they
talk to a shared service)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import uvicorn

from hepopt.errors import HepoptError
from orchestrator.app import create_app
from orchestrator.config import Settings
from orchestrator.storage import open_storage
from orchestrator.storage.base import Storage

LOOPBACK = "127.0.0.1"
#: How long the embedded server may take to start or to stop.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
START_POLL_S = 0.01
LOG_LEVEL = "warning"
#: Pending connections the pre-forked server's socket queues (uvicorn's own default).
LISTEN_BACKLOG = 2048
#: Allocations between collections of the youngest generation (Python's default is 700).
GC_YOUNG_THRESHOLD = 10_000
#: A pre-forked server process that dies sooner than this after starting is not replaced: the cause
#: (a bad TLS key, an unreachable database) would kill every replacement too.
MIN_CHILD_LIFETIME_S = 10.0

log = logging.getLogger(__name__)


def run_server(settings: Settings, host: str, port: int, tls_cert: str | None = None,
               tls_key: str | None = None, log_level: str = "info", access_log: bool = False,
               workers: int = 1) -> None:
    """Serve until interrupted (SIGINT/SIGTERM stop it cleanly, the scheduler with it).

    The access log is off unless asked for: one line per report request is most of the log and costs
    CPU that the request path needs. With ``workers`` > 1 that many processes share the listening
    socket (:func:`serve_prefork`), so requests are not all serialised on one interpreter lock."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("give both tls_cert and tls_key, or neither")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    options: dict[str, Any] = {"ssl_certfile": tls_cert, "ssl_keyfile": tls_key, "log_level": log_level,
                               "access_log": access_log, "proxy_headers": False, "server_header": False}
    if workers == 1:
        app = create_app(settings)
        settle_garbage_collector()
        uvicorn.run(app, host=host, port=port, **options)
    else:
        serve_prefork(settings, host, port, workers, options)


def settle_garbage_collector() -> None:
    """Exempt what the server built at start-up from garbage collection, and collect young objects
    less often.

    The imported modules, the app and its schemas are some 130,000 objects that live as long as the
    process; every full collection walked them all, a pause of about 0.1 s on the 2-core test machine
    that every request then in flight waited for. Requests free almost everything they allocate by
    reference counting, so younger collections can be rarer. Only for a process that is the server
    (``hepopt serve``): an embedded server leaves its host's collector alone."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def serve_prefork(settings: Settings, host: str, port: int, workers: int, options: dict[str, Any]) -> None:
    """``workers`` forked server processes on one socket, supervised by this one.

    The schema is migrated here, once, before forking. Each child opens its own storage and runs its
    own scheduler: the storage serialises writers (SQLite: BEGIN IMMEDIATE and busy timeout;
    PostgreSQL: row locks), reaping twice is harmless, and the steering claim is a database row, so a
    study is steered by one process at a time. A child that dies is replaced; SIGTERM/SIGINT stop all.
    """
    open_storage(settings.db_url).close()
    sock = _listening_socket(host, port)
    signals = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    children: dict[int, float] = {}
    log.info("serving on %s:%d with %d processes", host, port, workers)
    try:
        for _ in range(workers):
            children[_fork_server(settings, sock, options)] = time.monotonic()
        while signal.sigwaitinfo(signals).si_signo == signal.SIGCHLD:
            for pid, started in _reap_children(children):
                if time.monotonic() - started < MIN_CHILD_LIFETIME_S:
                    raise HepoptError(f"server process {pid} exited {MIN_CHILD_LIFETIME_S:g} s after starting "
                                      "or sooner; stopping (see the log above)")
                log.error("server process %d exited; starting a replacement", pid)
                children[_fork_server(settings, sock, options)] = time.monotonic()
    finally:
        _stop_children(children)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
        sock.close()


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


def _fork_server(settings: Settings, sock: socket.socket, options: dict[str, Any]) -> int:
    """Start one server process on ``sock``; returns its pid (the child never returns)."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        config = uvicorn.Config(create_app(settings), lifespan="on", **options)
        settle_garbage_collector()
        uvicorn.Server(config).run(sockets=[sock])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception:
        log.exception("server process %d failed", os.getpid())
    finally:
        os._exit(code)


def _reap_children(children: dict[int, float]) -> list[tuple[int, float]]:
    """Collect the children that have exited, without waiting: (pid, start time) of each."""
    gone = []
    for pid in list(children):
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            gone.append((pid, children.pop(pid)))
    return gone


def _stop_children(children: dict[int, float]) -> None:
    """SIGTERM every child (each stops gracefully), then SIGKILL what is left after STOP_TIMEOUT_S."""
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while children and time.monotonic() < deadline:
        _reap_children(children)
        time.sleep(START_POLL_S)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    children.clear()


class EmbeddedServer:
    """The service on a free loopback port for the length of a ``with`` block; ``.url`` is its address.

    ``storage`` is the app's storage (opened from ``settings.db_url`` unless given), handy for minting
    the first user token.
    """

    def __init__(self, settings: Settings, storage: Storage | None = None, log_level: str = LOG_LEVEL) -> None:
        self.settings = settings
        self.app = create_app(settings, storage)
        self.storage: Storage = self.app.state.service.storage
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((LOOPBACK, 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        config = uvicorn.Config(self.app, log_level=log_level, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="hepopt-embedded-server", daemon=True)

    def start(self) -> EmbeddedServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise HepoptError(f"the embedded orchestrator did not start on {self.url}")
            time.sleep(START_POLL_S)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)
        self._sock.close()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
