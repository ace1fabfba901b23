"""The runHPO payload (DESIGN.md §3.4): train MLPF on one hyperparameter point, write ``output.json``.

In its working directory the payload reads ``input.json`` (the bare point), ``input_ds.json`` (a JSON
list of training files or directories, relative to the working directory) and writes ``output.json``::

    {"status": 0, "loss": <final validation loss>, "message": "..."}                 trained to the end
    {"status": 0, "loss": <last>, "pruned": true, "message": "pruned at epoch k"}    stopped by hepopt
    {"status": 1, "loss": null, "message": "..."}      training failed (NaN/inf loss, out of memory, ...)
    {"status": 2, "loss": null, "message": "..."}      bad input: the message names the file and key
    {"status": 75, "loss": null, "preempted": true, "message": "..."}   SIGTERM: checkpoint written

A missing ``input_ds.json``, or an empty list (what a hepopt worker writes for a task without local
``trainingDS``), means the default generated toy dataset. An ``output.json`` left by an earlier attempt
is removed first, so a crash can never leave a stale success behind.

Preemption: on SIGTERM the trainer finishes its step, writes its checkpoint and raises ``Preempted``; the
payload then writes the status-75 document above and exits with ``EXIT_PREEMPTED`` (75). The point is not
finished: a rerun in the same directory (or one with the checkpoint restored) resumes and overwrites
``output.json``. A hepopt worker never reads that document (it stopped the payload itself and releases
the point); for PanDA it is an honest failure report of that attempt, whose retry resumes.

With the ``HEPOPT_*`` variables set (a hepopt worker), each epoch's validation loss is reported through
:class:`hepopt.reporting.Reporter` with the 1-based epoch as the step, and training stops when the
orchestrator says so. Every run is logged to MLflow in ``./mlruns`` and, when asked (``--metrics`` or
``HEPOPT_EVALUATION_METRICS``, i.e. the task's ``evaluationMetrics``), tarred into that file.

The process exit code equals ``status``, so a batch system sees a failure even without reading the file.
"""

from __future__ import annotations

import json
import math
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation_container.tracking import DEFAULT_EXPERIMENT, MLRUNS_DIR, PREEMPTED, RunLogger, tar_directory
from hepopt.errors import SpecError
from hepopt.files import write_json_atomically
from hepopt.reporting import ENV_STUDY, ENV_TRIAL, Reporter

STATUS_OK = 0
STATUS_FAILED = 1
STATUS_BAD_INPUT = 2
#: The task's ``evaluationMetrics`` file name, for a worker that passes it in the environment.
METRICS_ENV = "HEPOPT_EVALUATION_METRICS"
DEFAULT_DATASET_LABEL = "default toy dataset"
#: MLflow tag values are kept short: the full message is in output.json.
MESSAGE_TAG = 500


@dataclass
class RunOptions:
    """Where the payload finds its files (the phpo ``evaluation*`` names) and how it trains."""

    workdir: Path = field(default_factory=Path.cwd)
    input_name: str = "input.json"
    input_ds_name: str = "input_ds.json"
    output_name: str = "output.json"
    metrics_tarball: str | None = None
    seed: int = 0
    max_events: int | None = None
    experiment: str = DEFAULT_EXPERIMENT


@dataclass
class Outcome:
    """What ``output.json`` says, and in which state the MLflow run ends."""

    status: int
    loss: float | None
    message: str
    pruned: bool = False
    preempted: bool = False

    @property
    def state(self) -> str:
        if self.preempted:
            return PREEMPTED
        if self.status != STATUS_OK:
            return "failed"
        return "pruned" if self.pruned else "done"

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"status": self.status, "loss": self.loss, "message": self.message}
        if self.pruned:
            doc["pruned"] = True
        if self.preempted:
            doc["preempted"] = True
        return doc


def run_hpo(options: RunOptions) -> int:
    """Evaluate the point in ``options.workdir``; writes the output file and returns the exit code."""
    output = options.workdir / options.output_name
    output.unlink(missing_ok=True)
    outcome = Evaluation(options).execute()
    write_output(output, outcome)
    print(f"{output.name}: {json.dumps(outcome.document())}", flush=True)
    return outcome.status


def write_output(path: Path, outcome: Outcome) -> None:
    """Atomically, so a reader never sees half a result."""
    write_json_atomically(path, outcome.document())


def read_point(path: Path) -> Any:
    """The point as :class:`evaluation_container.config.HyperParams` (SpecError naming file and key)."""
    from evaluation_container.config import load_hyperparams

    return load_hyperparams(path)


def training_files(path: Path) -> list[Path] | None:
    """The files listed in ``input_ds.json`` (directories expanded), or None for the default dataset."""
    from evaluation_container.data import read_input_ds, resolve_files

    if not path.exists() or _is_empty_list(path):
        return None
    listed = [entry if entry.is_absolute() else path.parent / entry for entry in read_input_ds(path)]
    return resolve_files(listed)


def _is_empty_list(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")) == []
    except (OSError, ValueError):
        return False  # read_input_ds reports the problem with its line and column


def default_files() -> list[Path]:
    from evaluation_container.data import default_dataset, resolve_files

    return resolve_files(default_dataset())


class Evaluation:
    """One point: read the inputs, train with reporting and MLflow logging, decide the outcome."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.workdir = options.workdir
        self.last_epoch: Any = None
        self.logged: set[int] = set()  # epochs already in the MLflow run
        self.reporter: Reporter | None = None
        self.logger: RunLogger | None = None

    def execute(self) -> Outcome:
        try:
            outcome = self._evaluate()
        except SpecError as exc:
            outcome = Outcome(STATUS_BAD_INPUT, None, f"bad input: {exc}")
        except Exception as exc:
            traceback.print_exc()
            outcome = Outcome(STATUS_FAILED, None, f"internal error: {type(exc).__name__}: {exc}")
        return self._close(outcome)

    def _evaluate(self) -> Outcome:
        params = read_point(self.workdir / self.options.input_name)
        files = training_files(self.workdir / self.options.input_ds_name)
        if files is None:
            print(f"{self.options.input_ds_name} absent or empty: training on the {DEFAULT_DATASET_LABEL}", flush=True)
            files = default_files()
        self.logger = RunLogger.open(self.workdir, self._run_name(), self._tags(files), self.options.experiment)
        self.logged = self.logger.logged_steps()
        self.logger.log_params(self._params(params, files))
        self.reporter = Reporter.from_env()
        return self._train(params, files)

    def _train(self, params: Any, files: list[Path]) -> Outcome:
        from evaluation_container.trainer import EXIT_PREEMPTED, Preempted, TrainingError, train

        try:
            result = train(params, files, self.workdir, seed=self.options.seed, on_epoch_end=self._on_epoch_end,
                           max_events=self.options.max_events)
        except Preempted as exc:
            return Outcome(EXIT_PREEMPTED, None, f"preempted: {exc}; a rerun in this directory resumes from the "
                           "checkpoint", preempted=True)
        except TrainingError as exc:
            return Outcome(STATUS_FAILED, None, f"training failed {self._where()}: {exc}")
        return self._judge(result)

    def _judge(self, result: Any) -> Outcome:
        """Success needs a finite loss; a run cut short by the orchestrator is reported as pruned."""
        if not result.history:
            return Outcome(STATUS_FAILED, None, "training ran no epoch")
        self._log_missing(result.history)
        last = result.history[-1]
        if result.stopped_early:
            return Outcome(STATUS_OK, float(last.val_loss), f"pruned at epoch {last.epoch}", pruned=True)
        loss = float(result.final_val_loss)
        if not math.isfinite(loss):
            return Outcome(STATUS_FAILED, None, f"non-finite validation loss {loss} after epoch {last.epoch}")
        resumed = f", resumed from epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else ""
        return Outcome(STATUS_OK, loss, f"trained {last.epoch} epoch(s){resumed}; final validation loss {loss:.6g}")

    def _on_epoch_end(self, epoch: Any) -> bool:
        """Log the epoch; True (stop now) when the orchestrator prunes the point or its lease is gone."""
        self._log_epoch(epoch)
        if self.reporter is None or not math.isfinite(epoch.val_loss):
            return False
        # Steps are 0-based (docs/EARLY_STOPPING.md): after step s a point has trained s + 1 epochs.
        return self.reporter.report(epoch.epoch - 1, float(epoch.val_loss))

    def _log_epoch(self, epoch: Any) -> None:
        self.last_epoch = epoch
        if self.logger is not None and epoch.epoch not in self.logged:
            self.logger.log_epoch(epoch)
            self.logged.add(epoch.epoch)

    def _log_missing(self, history: list[Any]) -> None:
        """Epochs the callback never saw: those of a checkpoint that was already complete, and one that ended
        just as SIGTERM came (the trainer checkpoints it and stops before calling back)."""
        for epoch in history:
            self._log_epoch(epoch)

    def _where(self) -> str:
        return f"after epoch {self.last_epoch.epoch}" if self.last_epoch is not None else "in the first epoch"

    def _close(self, outcome: Outcome) -> Outcome:
        """End the MLflow run and write the metrics tarball. A failure here keeps the point's result (the loss
        is valid) but is stated in its message."""
        if self.reporter is not None:
            self.reporter.close()
        try:
            if self.logger is not None:
                step = self.last_epoch.epoch if self.last_epoch is not None else 0
                self.logger.finish(outcome.state, outcome.loss, step, {"hepopt.message": outcome.message[:MESSAGE_TAG]})
            target = self.options.metrics_tarball or os.environ.get(METRICS_ENV)
            mlruns = self.workdir / MLRUNS_DIR
            if target and mlruns.is_dir():
                tar_directory(mlruns, self.workdir / target)
        except Exception as exc:
            traceback.print_exc()
            outcome.message += f"; warning: MLflow logs not finalised ({type(exc).__name__}: {exc})"
        return outcome

    def _run_name(self) -> str:
        trial = os.environ.get(ENV_TRIAL)
        return f"point-{trial}" if trial else self.workdir.resolve().name

    def _tags(self, files: list[Path]) -> dict[str, str]:
        tags = {"hepopt.input": self.options.input_name, "hepopt.files": str(len(files))}
        for name, tag in ((ENV_STUDY, "hepopt.study"), (ENV_TRIAL, "hepopt.trial")):
            if os.environ.get(name):
                tags[tag] = os.environ[name]
        return tags

    def _params(self, params: Any, files: list[Path]) -> dict[str, Any]:
        return {**params.model_dump(), "seed": self.options.seed, "max_events": self.options.max_events,
                "training_files": len(files)}

