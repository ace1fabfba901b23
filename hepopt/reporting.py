"""The payload's optional channel to the orchestrator (DESIGN.md §3.4): report per-epoch values, learn
whether to stop early.

A worker sets the ``HEPOPT_*`` variables when it starts a payload. Without them
:meth:`Reporter.from_env` returns None and the payload behaves exactly as under PanDA, so training code
reads::

    reporter = Reporter.from_env()
    ...
    for epoch in range(epochs):          # steps are 0-based epoch indices
        ...
        if reporter and reporter.report(epoch, val_loss):
            break  # pruned: write output.json and exit
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from hepopt.client import Client
from hepopt.errors import ClientError, StaleLease

log = logging.getLogger(__name__)

ENV_URL = "HEPOPT_URL"
ENV_TOKEN = "HEPOPT_TOKEN"
ENV_STUDY = "HEPOPT_STUDY"
ENV_TRIAL = "HEPOPT_TRIAL"
ENV_LEASE = "HEPOPT_LEASE"
REQUIRED_ENV = (ENV_URL, ENV_TOKEN, ENV_STUDY, ENV_TRIAL, ENV_LEASE)
#: Reports are small and frequent: fail fast rather than stall an epoch on a slow network.
REPORT_TIMEOUT_S = 10.0
REPORT_RETRIES = 2


class Reporter:
    """Reports one point's learning curve. Never raises for transport problems: training goes on."""

    def __init__(self, client: Client, study_id: int, point_id: int, lease_token: str) -> None:
        self.client = client
        self.study_id = study_id
        self.point_id = point_id
        self.lease_token = lease_token

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Reporter | None:
        """A reporter when the worker set every HEPOPT_* variable, else None (the PanDA case)."""
        env = os.environ if environ is None else environ
        if not all(env.get(name) for name in REQUIRED_ENV):
            return None
        client = Client(env[ENV_URL], env[ENV_TOKEN], timeout=REPORT_TIMEOUT_S, retries=REPORT_RETRIES)
        return cls(client, int(env[ENV_STUDY]), int(env[ENV_TRIAL]), env[ENV_LEASE])

    def report(self, step: int, value: float) -> bool:
        """Send the value at 0-based ``step`` (epoch index); True means stop now (pruned, or lease lost)."""
        try:
            return self.client.report(self.study_id, self.point_id, self.lease_token, step, value)
        except StaleLease:
            log.warning("point %d: the lease is no longer valid; stopping", self.point_id)
            return True
        except ClientError as exc:
            log.warning("point %d: could not report step %d (%s); continuing", self.point_id, step, exc)
            return False

    def close(self) -> None:
        self.client.close()
