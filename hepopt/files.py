"""Atomic file writes, shared by every room: a reader (iDDS, PanDA, a resumed job) sees the old file or
the whole new one, never half of it, even if the writer is killed mid-write."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

#: mkstemp creates 0600; results and shared datasets must stay readable by the other users of a site.
FILE_MODE = 0o644


@contextmanager
def atomic_writer(path: str | Path, binary: bool = True) -> Iterator[IO[Any]]:
    """A stream to a temporary file next to ``path``; on success it is fsynced and renamed over ``path``,
    on any error removed."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomically(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_writer`."""
    with atomic_writer(path, binary=isinstance(data, bytes)) as stream:
        stream.write(data)


def write_json_atomically(path: str | Path, data: Any, indent: int | None = None) -> None:
    """JSON (one trailing newline) through :func:`atomic_writer`."""
    write_atomically(path, json.dumps(data, indent=indent) + "\n")
