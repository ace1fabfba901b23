"""The checkpoint store: one file per point under ``data_dir/checkpoints/<study>/``.

An upload streams into a temporary file beside its destination, is checked against the size cap and
the announced sha256, fsynced and renamed over the previous checkpoint, so a reader sees the old file or
the whole new one and a failed upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from hepopt.errors import HepoptError

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
SUFFIX = ".ckpt"


class CheckpointTooLarge(HepoptError):
    """The upload exceeds the configured limit (HTTP 413)."""


class CheckpointInvalid(HepoptError, ValueError):
    """A malformed or mismatching checksum (HTTP 422)."""


@dataclass(frozen=True)
class Stored:
    """A checkpoint written to disk; ``path`` is relative to the data directory."""

    path: str
    sha256: str
    size: int


class CheckpointStore:
    """Writes and finds checkpoint files; metadata lives in storage, bytes live here."""

    def __init__(self, data_dir: Path, subdir: str, max_bytes: int) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / subdir
        self.max_bytes = max_bytes

    def relative_path(self, study_id: int, point_id: int) -> Path:
        return self.root.relative_to(self.data_dir) / str(study_id) / f"{point_id}{SUFFIX}"

    def absolute(self, relative: str) -> Path:
        return self.data_dir / relative

    async def save(self, study_id: int, point_id: int, chunks: AsyncIterator[bytes], expected_sha256: str) -> Stored:
        """Stream ``chunks`` to disk and publish them atomically once size and checksum are right.

        Over the limit the rest of the body is read and dropped, so the client receives the 413 answer
        instead of a broken connection.
        """
        expected = normalise_sha256(expected_sha256)
        relative = self.relative_path(study_id, point_id)
        target = self.absolute(str(relative))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            size, actual = await self._write(fd, chunks)
            if actual != expected:
                raise CheckpointInvalid(f"checksum mismatch: received bytes have sha256 {actual}, "
                                        f"header says {expected}")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Stored(str(relative), actual, size)

    async def _write(self, fd: int, chunks: AsyncIterator[bytes]) -> tuple[int, str]:
        digest, size, too_large = hashlib.sha256(), 0, False
        with os.fdopen(fd, "wb") as fh:
            async for chunk in chunks:
                size += len(chunk)
                too_large = too_large or size > self.max_bytes
                if not too_large:
                    fh.write(chunk)
                    digest.update(chunk)
            if not too_large:
                fh.flush()
                os.fsync(fh.fileno())
        if too_large:
            raise CheckpointTooLarge(f"checkpoint exceeds the limit of {self.max_bytes} bytes")
        return size, digest.hexdigest()


def normalise_sha256(value: str) -> str:
    """Lowercase hex; anything else is refused before a byte is stored."""
    value = value.strip().lower()
    if not SHA256_HEX.match(value):
        raise CheckpointInvalid("X-Checksum-Sha256 must be 64 hexadecimal digits")
    return value
