"""Persistent state of the orchestrator behind one interface (:class:`Storage`), with SQL backends.

``open_storage(url)`` is the entry point: ``sqlite:///path/hepopt.db`` for one machine,
``postgresql://user@host/db`` for a shared service. The schema is migrated on open.
"""

from __future__ import annotations

from orchestrator.storage.base import (
    FINAL_STATES,
    CheckpointMeta,
    ConflictError,
    FinishResult,
    InvalidValueError,
    Lease,
    NotFoundError,
    PointCounts,
    PointRecord,
    PointState,
    Progress,
    StaleLeaseError,
    SteeringStatus,
    Storage,
    StorageError,
    StudyRecord,
    StudyState,
    TokenInfo,
)

__all__ = [
    "FINAL_STATES",
    "CheckpointMeta",
    "ConflictError",
    "FinishResult",
    "InvalidValueError",
    "Lease",
    "NotFoundError",
    "PointCounts",
    "PointRecord",
    "PointState",
    "Progress",
    "StaleLeaseError",
    "SteeringStatus",
    "Storage",
    "StorageError",
    "StudyRecord",
    "StudyState",
    "TokenInfo",
    "open_storage",
]


def open_storage(url: str) -> Storage:
    """A migrated storage for a SQLAlchemy URL (SQLAlchemy is imported only when a storage is opened)."""
    from orchestrator.storage.sql import SQLStorage

    return SQLStorage(url)
