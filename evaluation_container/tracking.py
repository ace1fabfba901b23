"""MLflow logging of one training run into ``./mlruns`` (DESIGN.md §3.4), optionally tarred for PanDA.

The payload runs on compute nodes that may have no network, so the tracking store is MLflow's local
file store, addressed by an explicit ``file:`` URI (never whatever ``MLFLOW_TRACKING_URI`` happens to say),
and telemetry is switched off. MLflow 3 refuses the file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set;
we set it for this process because ``./mlruns`` is the PanDA contract, not a choice.

A run that is preempted ends with status KILLED and the tag ``hepopt.state = preempted``; when the working
directory (with its ``mlruns``) is restored and training resumes, that run is continued, so one point
has one MLflow run with one unbroken curve.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

MLRUNS_DIR = "mlruns"
DEFAULT_EXPERIMENT = "hepopt-mlpf"
#: Environment MLflow needs for an offline file store (set only where the user has not chosen otherwise).
MLFLOW_ENVIRONMENT = {"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
STATE_TAG = "hepopt.state"
PREEMPTED = "preempted"
#: How each final state of a point shows in MLflow's run status.
RUN_STATUS = {"done": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", PREEMPTED: "KILLED"}
HEAD_PREFIX = "val_loss_"
MILLISECONDS = 1000


class EpochLike(Protocol):
    """The fields of :class:`evaluation_container.trainer.EpochResult` that are logged."""

    epoch: int
    train_loss: float
    val_loss: float
    head_losses: dict[str, float]
    physics: dict[str, float]
    epoch_time: float
    train_events: int
    padded_fraction: float


def tracking_uri(workdir: Path) -> str:
    """The ``file:`` URI of ``<workdir>/mlruns``."""
    return (workdir / MLRUNS_DIR).resolve().as_uri()


def epoch_metrics(result: EpochLike) -> dict[str, float]:
    """One epoch as MLflow metrics: total losses, per-head validation losses, physics figures, timing."""
    metrics = {"train_loss": result.train_loss, "val_loss": result.val_loss, "epoch_time": result.epoch_time,
               "padded_fraction": result.padded_fraction}
    if result.epoch_time > 0:
        metrics["train_events_per_s"] = result.train_events / result.epoch_time
    metrics.update({f"{HEAD_PREFIX}{head}": value for head, value in result.head_losses.items()})
    metrics.update(result.physics)
    return {key: float(value) for key, value in metrics.items()}


@dataclass
class RunLogger:
    """One MLflow run of one point. Create it with :meth:`open`."""

    client: Any
    run_id: str
    resumed: bool

    @classmethod
    def open(cls, workdir: Path, run_name: str, tags: Mapping[str, str] | None = None,
             experiment: str = DEFAULT_EXPERIMENT) -> RunLogger:
        """Continue the preempted run found in ``<workdir>/mlruns``, or start a new one."""
        for key, value in MLFLOW_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri(workdir))
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        previous = client.search_runs([experiment_id], filter_string=f"tags.`{STATE_TAG}` = '{PREEMPTED}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
        if previous:
            run_id = previous[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, STATE_TAG, "running")
            return cls(client, run_id, resumed=True)
        run = client.create_run(experiment_id, run_name=run_name, tags={STATE_TAG: "running", **(tags or {})})
        return cls(client, run.info.run_id, resumed=False)

    def logged_steps(self) -> set[int]:
        """Epochs a continued run already holds (a new run holds none)."""
        if not self.resumed:
            return set()
        return {metric.step for metric in self.client.get_metric_history(self.run_id, "val_loss")}

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Hyperparameters and run settings; a resumed run already holds them (values cannot change)."""
        if self.resumed:
            return
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in params.items()])

    def log_epoch(self, result: EpochLike) -> None:
        self.log_metrics(epoch_metrics(result), step=result.epoch)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * MILLISECONDS)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def finish(self, state: str, loss: float | None, step: int, tags: Mapping[str, str] | None = None) -> None:
        """Close the run: ``state`` is done, pruned, failed or preempted (see RUN_STATUS)."""
        if loss is not None:
            self.log_metrics({"final_val_loss": loss}, step=step)
        for key, value in {STATE_TAG: state, **(tags or {})}.items():
            self.client.set_tag(self.run_id, key, value)
        self.client.set_terminated(self.run_id, status=RUN_STATUS[state])


def tar_directory(directory: Path, target: Path) -> Path:
    """``directory`` as a gzipped tarball at ``target`` (named by its base name inside), written atomically
    so an upload never picks up half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        with tarfile.open(temporary, "w:gz") as tar:
            tar.add(directory, arcname=directory.name)
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target
