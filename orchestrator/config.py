"""The orchestrator's settings, in one place with named defaults, so the CLI, the embedded server and
tests configure the same knobs the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path("hepopt-data")
DATABASE_FILE = "hepopt.db"
CHECKPOINT_DIR = "checkpoints"
#: The largest checkpoint a worker may upload (500 MB); larger ones get 413.
DEFAULT_CHECKPOINT_MAX_BYTES = 500 * 1000 * 1000
#: Expired leases are returned to the queue this often.
DEFAULT_REAPER_INTERVAL_S = 10.0
#: Every running study is checked for steering this often even when nobody asks.
DEFAULT_STEERING_INTERVAL_S = 5.0
#: What ``ask`` tells a worker to wait when no point is ready yet.
DEFAULT_RETRY_AFTER_S = 2.0
#: A steering claim not renewed for this many renew intervals belongs to a crashed server.
STEERING_CLAIM_RENEWALS = 3
#: Upper bound on the renew interval of a steering claim, whatever the steering interval.
MAX_STEERING_RENEW_S = 10.0
#: Tries of one steering run before the study shows "steering failed" (iDDS also tries 3 times).
DEFAULT_STEERING_RETRIES = 3
#: Wall-clock limit of one steering try (an external steeringExec or an in-process proposal).
DEFAULT_STEERING_TIMEOUT_S = 600.0
#: After a failed steering run the study is left alone this long, so a broken command is not hammered.
DEFAULT_STEERING_BACKOFF_S = 60.0
#: Steering runs of different studies that may proceed at once.
DEFAULT_STEERING_WORKERS = 4
#: Worker tokens live a day unless asked otherwise, and never longer than 30 days.
DEFAULT_WORKER_TOKEN_S = 24 * 3600.0
MAX_WORKER_TOKEN_S = 30 * 24 * 3600.0
#: How long a study's cached learning curves serve stopping decisions before being re-read.
DEFAULT_STOPPING_CACHE_S = 30.0


@dataclass(frozen=True)
class Settings:
    """Everything an orchestrator process needs to know.

    ``db_url`` defaults to a SQLite file in ``data_dir``. ``allow_steering_exec`` lets tasks run their
    own ``steeringExec`` command on the server; it is off by default because on a shared service that
    command is arbitrary code from any token holder — turn it on for a private server (``hepopt run``).
    """

    data_dir: Path = DEFAULT_DATA_DIR
    db_url: str = ""
    checkpoint_max_bytes: int = DEFAULT_CHECKPOINT_MAX_BYTES
    reaper_interval: float = DEFAULT_REAPER_INTERVAL_S
    steering_interval: float = DEFAULT_STEERING_INTERVAL_S
    retry_after: float = DEFAULT_RETRY_AFTER_S
    steering_retries: int = DEFAULT_STEERING_RETRIES
    steering_timeout: float = DEFAULT_STEERING_TIMEOUT_S
    steering_backoff: float = DEFAULT_STEERING_BACKOFF_S
    steering_workers: int = DEFAULT_STEERING_WORKERS
    allow_steering_exec: bool = False
    worker_token_seconds: float = DEFAULT_WORKER_TOKEN_S
    max_worker_token_seconds: float = MAX_WORKER_TOKEN_S
    stopping_cache_seconds: float = DEFAULT_STOPPING_CACHE_S

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if not self.db_url:
            object.__setattr__(self, "db_url", f"sqlite:///{self.data_dir.resolve() / DATABASE_FILE}")
        if self.checkpoint_max_bytes < 0 or self.steering_retries < 1 or self.steering_workers < 1:
            raise ValueError("checkpoint_max_bytes must be >= 0, steering_retries and steering_workers >= 1")
        for name in ("reaper_interval", "steering_interval", "retry_after", "steering_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / CHECKPOINT_DIR

    @property
    def steering_claim_seconds(self) -> float:
        """After this long without renewal a steering claim is presumed dead (its server crashed) and
        taken over: a restarted server steers again within seconds, not after a whole steering timeout."""
        return STEERING_CLAIM_RENEWALS * self.steering_renew_interval

    @property
    def steering_renew_interval(self) -> float:
        """How often a running steering run renews its claim."""
        return min(self.steering_interval, MAX_STEERING_RENEW_S)
