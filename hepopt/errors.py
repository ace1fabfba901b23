"""Exceptions shared by every room.

Each error carries the location of the problem (a key path, a file, a line) so that a user can fix
the input without reading a traceback.
"""

from __future__ import annotations


class HepoptError(Exception):
    """Base class of every error hepopt raises on purpose."""


class SpecError(HepoptError, ValueError):
    """Invalid user input: a task JSON, a search space, a history.

    ``problems`` is a list of ``(location, message)`` pairs; ``location`` is a dotted key path such
    as ``searchSpace.lr.dimension.low`` or ``points[3]``.
    """

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        lines = [f"{loc}: {msg}" if loc else msg for loc, msg in self.problems]
        if len(lines) == 1:
            return prefix + lines[0]
        return prefix + f"{len(lines)} problems:\n" + "\n".join(f"  - {line}" for line in lines)

    def within(self, outer: str) -> SpecError:
        """The same problems, located under ``outer`` (for nested documents)."""
        return SpecError([(join_path(outer, loc), msg) for loc, msg in self.problems], self.source)


def join_path(outer: str, inner: str) -> str:
    """Join two key paths: ``join_path('a', 'b')`` is ``a.b``, ``join_path('a', '[0]')`` is ``a[0]``."""
    if not outer:
        return inner
    if not inner:
        return outer
    return outer + inner if inner.startswith("[") else f"{outer}.{inner}"


class ClientError(HepoptError):
    """An orchestrator call that failed; ``status`` is the HTTP status (None when no answer came)."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


class Unauthorized(ClientError):
    """401: the token is missing, unknown or expired."""


class Forbidden(ClientError):
    """403: a worker token used outside its study, or for a call only users may make."""


class NotFound(ClientError):
    """404: no such study or point, or it belongs to another user."""


class StaleLease(ClientError):
    """409: the lease is no longer current (expired, released or finished); drop the point."""


class PayloadTooLarge(ClientError):
    """413: the checkpoint exceeds the server's size limit."""


class InvalidRequest(ClientError):
    """422: a malformed body or an invalid task; the message names the key path."""


class ChecksumMismatch(ClientError):
    """Downloaded bytes do not match the checksum the server announced."""
