"""Running the service: :func:`run_server` for ``hepopt serve``, :class:`EmbeddedServer` for ``hepopt run``
and tests (a real HTTP server on loopback in a background thread, so workers talk to it exactly as they
talk to a shared service)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from hepopt.errors import HepoptError
from orchestrator.app import create_app
from orchestrator.config import Settings
from orchestrator.storage.base import Storage

LOOPBACK = "127.0.0.1"
#: How long the embedded server may take to start or to stop.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
START_POLL_S = 0.01
LOG_LEVEL = "warning"


def run_server(settings: Settings, host: str, port: int, tls_cert: str | None = None,
               tls_key: str | None = None, log_level: str = "info", access_log: bool = False) -> None:
    """Serve until interrupted (SIGINT/SIGTERM stop it cleanly, the scheduler with it).

    The access log is off unless asked for: one line per report request is most of the log and costs
    CPU that the request path needs."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("give both tls_cert and tls_key, or neither")
    uvicorn.run(create_app(settings), host=host, port=port, ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                log_level=log_level, access_log=access_log, proxy_headers=False)


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
