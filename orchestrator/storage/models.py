"""SQLAlchemy tables of the SQL backend.

The Alembic migrations under ``migrations/versions`` must produce exactly this metadata (a test
compares them); change both together. Budget fields of the task are copied into columns so the hot
paths (lease, reap) never parse task JSON. Times are float epoch seconds.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Deterministic constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
#: Column widths: user and worker names, short enums, request ids and hex digests.
NAME_LENGTH = 255
STATE_LENGTH = 16
REQUEST_ID_LENGTH = 128
DIGEST_LENGTH = 64


class StateString(TypeDecorator[str]):
    """A short string column that stores an Enum member as its value (drivers differ on enums)."""

    impl = String(STATE_LENGTH)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return value.value if isinstance(value, Enum) else value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class StudyRow(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    name: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    task_json: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(StateString(), index=True)
    message: Mapped[str | None] = mapped_column(Text)
    max_points: Mapped[int] = mapped_column(Integer)
    max_evaluation_jobs: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_seconds: Mapped[float] = mapped_column(Float)
    direction: Mapped[str] = mapped_column(StateString())
    failed_loss: Mapped[float | None] = mapped_column(Float)
    n_points: Mapped[int] = mapped_column(Integer)
    evaluation_jobs: Mapped[int] = mapped_column(Integer)
    steering_started_at: Mapped[float | None] = mapped_column(Float)
    steering_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class PointRow(Base):
    __tablename__ = "points"
    __table_args__ = (
        UniqueConstraint("study_id", "number"),
        Index("ix_points_study_id_state_number", "study_id", "state", "number"),
        Index("ix_points_state_lease_expires_at", "state", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    params_json: Mapped[str] = mapped_column(Text)
    origin: Mapped[str] = mapped_column(String(NAME_LENGTH))
    state: Mapped[str] = mapped_column(StateString())
    attempt: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    message: Mapped[str | None] = mapped_column(Text)
    worker_id: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    lease_token: Mapped[str | None] = mapped_column(String(DIGEST_LENGTH))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    finish_request_id: Mapped[str | None] = mapped_column(String(REQUEST_ID_LENGTH), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


class LeaseRow(Base):
    """Every lease ever granted: the audit trail that proves no point was held twice at once.

    The partial unique index allows at most one open lease (``ended_at IS NULL``) per point, so the
    database itself refuses a double lease whatever the code above it does.
    """

    __tablename__ = "leases"
    __table_args__ = (
        Index("ix_leases_point_id", "point_id"),
        Index("uq_leases_open_point_id", "point_id", unique=True,
              sqlite_where="ended_at IS NULL", postgresql_where="ended_at IS NULL"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    point_id: Mapped[int] = mapped_column(ForeignKey("points.id", ondelete="CASCADE"))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    worker_id: Mapped[str] = mapped_column(String(NAME_LENGTH))
    lease_token: Mapped[str] = mapped_column(String(DIGEST_LENGTH), unique=True)
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str | None] = mapped_column(StateString())


class IntermediateRow(Base):
    __tablename__ = "intermediate_values"
    __table_args__ = (UniqueConstraint("point_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    point_id: Mapped[int] = mapped_column(ForeignKey("points.id", ondelete="CASCADE"))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"

    point_id: Mapped[int] = mapped_column(ForeignKey("points.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    size: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[float] = mapped_column(Float)


class TokenRow(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(DIGEST_LENGTH), unique=True)
    user: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
