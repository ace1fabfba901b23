"""The runHPO payload: ``python -m evaluation_container run`` in a working directory (DESIGN.md §3.4).

Real runs train a tiny MLPF on a few toy events in a subprocess, exactly as a worker starts the payload;
pruning is decided by a real embedded orchestrator. The outcome mapping of trainer exceptions is
checked in-process with a stand-in ``train`` (unit tests), since NaN losses and OOM cannot be provoked
reliably in a short real run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from evaluation_container import runner, trainer
from evaluation_container.data import generate_dataset
from evaluation_container.runner import RunOptions, run_hpo
from evaluation_container.tracking import MLRUNS_DIR

#: A tiny model: a real run takes seconds after TensorFlow's start-up.
TINY = {"lr": 1e-3, "num_graph_layers_id": 1, "num_graph_layers_reg": 1, "bin_size": 64, "output_dim": 16,
        "batch_size": 4, "epochs": 2}
PAYLOAD_TIMEOUT_S = 180
#: 8 training events in 2 full batches and 2 validation events: one batch shape, so one trace of each step.
MAX_EVENTS_N = 10
MAX_EVENTS = ("--max-events", str(MAX_EVENTS_N))
WAIT_POLL_S = 0.1
EXIT_PREEMPTED = trainer.EXIT_PREEMPTED


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One file of 12 small events (the payload splits off 20% for validation)."""
    return generate_dataset(tmp_path_factory.mktemp("toy"), files=1, events_per_file=12, seed=3, min_elements=30,
                            max_elements=60)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a payload started outside hepopt: no HEPOPT_* channel, no MLflow server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEPOPT_", "MLFLOW_"))}
    return {**env, **extra}


def _workdir(base: Path, point: dict[str, Any] | str, files: list[Path] | None = None) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    (base / "input.json").write_text(point if isinstance(point, str) else json.dumps(point))
    if files is not None:
        (base / "input_ds.json").write_text(json.dumps([str(f) for f in files]))
    return base


def _payload(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evaluation_container", "run", *args], cwd=workdir,
                          env=env or _clean_env(), capture_output=True, text=True, timeout=PAYLOAD_TIMEOUT_S,
                          check=False)


def _output(workdir: Path) -> dict[str, Any]:
    return json.loads((workdir / "output.json").read_text())


def _run_dir(workdir: Path) -> Path:
    runs = [meta.parent for meta in (workdir / MLRUNS_DIR).glob("*/*/meta.yaml")]
    assert len(runs) == 1, f"expected one MLflow run, found {runs}"
    return runs[0]


def _metric_steps(run: Path, name: str) -> list[tuple[int, float]]:
    lines = (run / "metrics" / name).read_text().split("\n")
    return sorted((int(line.split()[2]), float(line.split()[1])) for line in lines if line)


# --- real runs ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_then_rerun_resumes_to_a_logged_success(tmp_path: Path, toy_files: list[Path]) -> None:
    """The whole life of a point in one directory: preempted after epoch 1 (exit 75, checkpoint, KILLED
    MLflow run), then a rerun that resumes, ends with a loss, continues the same MLflow run and tars it."""
    work = _workdir(tmp_path, {**TINY, "epochs": 5}, toy_files)
    _preempt_after_first_epoch(work)
    doc = _output(work)
    assert doc["status"] == EXIT_PREEMPTED and doc["preempted"] is True and doc["loss"] is None, doc
    assert "checkpoint" in doc["message"], doc
    assert (work / "checkpoints").is_dir() and any((work / "checkpoints").iterdir())
    assert (_run_dir(work) / "tags" / "hepopt.state").read_text() == "preempted"

    # the rerun in this process: the command line was exercised above, TensorFlow's start-up need not be paid twice
    assert run_hpo(RunOptions(workdir=work, max_events=MAX_EVENTS_N, metrics_tarball="metrics.tgz")) == 0
    doc = _output(work)
    assert set(doc) == {"status", "loss", "message"} and doc["status"] == 0, doc
    assert math.isfinite(doc["loss"]) and doc["loss"] > 0, doc
    assert "trained 5 epoch(s), resumed from epoch" in doc["message"], doc
    _assert_mlflow_run(work, doc["loss"], epochs=5)
    with tarfile.open(work / "metrics.tgz") as tar:
        assert any(name.endswith("metrics/val_loss") for name in tar.getnames())


def _preempt_after_first_epoch(work: Path) -> None:
    log = work / "payload.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "evaluation_container", "run", *MAX_EVENTS], cwd=work,
                                env=_clean_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: list(work.glob(f"{MLRUNS_DIR}/*/*/metrics/val_loss")), proc, "the first epoch to end")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(PAYLOAD_TIMEOUT_S) == EXIT_PREEMPTED, log.read_text()
    finally:
        proc.kill()


def _assert_mlflow_run(work: Path, loss: float, epochs: int) -> None:
    """One run (the preempted one, continued) with the point's params and every epoch's metrics."""
    run = _run_dir(work)
    assert json.loads((run / "params" / "lr").read_text()) == TINY["lr"]
    assert (run / "params" / "output_dim").read_text() == str(TINY["output_dim"])
    assert [step for step, _ in _metric_steps(run, "val_loss")] == list(range(1, epochs + 1))
    assert _metric_steps(run, "final_val_loss") == [(epochs, pytest.approx(loss))]
    metrics = {p.name for p in (run / "metrics").iterdir()}
    assert {"train_loss", "epoch_time", "padded_fraction", "train_events_per_s"} <= metrics, metrics
    assert any(name.startswith("val_loss_") for name in metrics), f"no per-head losses in {metrics}"
    assert len(metrics) > len({"train_loss", "val_loss", "epoch_time", "padded_fraction", "train_events_per_s",
                               "final_val_loss"}) + 1, f"no physics figures in {metrics}"
    assert (run / "tags" / "hepopt.state").read_text() == "done"


BAD_POINTS = [
    pytest.param({**TINY, "learning_rate": 0.1}, None, ("input.json", "learning_rate", "unknown key"),
                 id="unknown-key"),
    pytest.param({**TINY, "bin_size": "big"}, None, ("input.json", "bin_size"), id="wrong-type"),
    pytest.param('{"lr": 0.001, "bin_', None, ("input.json", "invalid JSON at line 1"), id="truncated-json"),
    pytest.param(TINY, '{"files": []}', ("input_ds.json", "JSON list"), id="input-ds-not-a-list"),
    pytest.param(TINY, '["missing.pkl.bz2"]', ("missing.pkl.bz2", "no such data file"), id="missing-data-file"),
]


@pytest.mark.parametrize(("point", "input_ds", "expected"), BAD_POINTS)
def test_bad_input_fails_with_status_2_naming_file_and_key(tmp_path: Path, point: Any, input_ds: str | None,
                                                          expected: tuple[str, ...]) -> None:
    work = _workdir(tmp_path, point)
    if input_ds is not None:
        (work / "input_ds.json").write_text(input_ds)
    (work / "output.json").write_text(json.dumps({"status": 0, "loss": 0.0, "message": "stale"}))
    result = _payload(work)
    doc = _output(work)
    assert result.returncode == 2 and doc["status"] == 2 and doc["loss"] is None, (doc, result.stderr)
    for text in expected:
        assert text in doc["message"], doc["message"]
    assert not (work / MLRUNS_DIR).exists(), "nothing is logged for a point that never started"


def test_missing_input_json_is_bad_input(tmp_path: Path) -> None:
    result = _payload(tmp_path)
    doc = _output(tmp_path)
    assert result.returncode == 2 and doc["status"] == 2, doc
    assert "input.json" in doc["message"] and "not found" in doc["message"], doc


def _wait_for(predicate: Any, proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + PAYLOAD_TIMEOUT_S
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the payload exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(WAIT_POLL_S)


@pytest.mark.slow
def test_pruned_when_a_real_orchestrator_says_so(tmp_path: Path, toy_files: list[Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Median rule with one peer whose curve is far better: the payload stops after epoch 1. The payload runs
    in this process (real trainer, real HTTP to the orchestrator) to spare a TensorFlow start-up."""
    from hepopt.client import Client
    from orchestrator.config import Settings
    from orchestrator.server import EmbeddedServer

    task = {"evaluationExec": "python -m evaluation_container run", "maxPoints": 2, "nParallelEvaluation": 2,
            "searchSpace": {"lr": {"method": "loguniform", "dimension": {"low": 1e-4, "high": 1e-2}}},
            "hepopt": {"method": "random", "seed": 1, "earlyStopping": {"policy": "median", "minTrials": 1}}}
    with EmbeddedServer(Settings(data_dir=tmp_path / "orchestrator", retry_after=0.05)) as server, \
            Client(server.url, server.storage.create_token("tester")) as user:
        study = user.create_study(task, name="prune")["id"]
        worker_token = user.create_worker_token(study)
        with Client(server.url, worker_token) as worker:
            peer, mine = _lease(worker, study, "peer"), _lease(worker, study, "mine")
            for step in (0, 1, 2):
                worker.report(study, peer.point_id, peer.lease_token, step, 1e-6)
            for name, value in (("HEPOPT_URL", server.url), ("HEPOPT_TOKEN", worker_token),
                                ("HEPOPT_STUDY", str(study)), ("HEPOPT_TRIAL", str(mine.point_id)),
                                ("HEPOPT_LEASE", mine.lease_token)):
                monkeypatch.setenv(name, value)
            work = _workdir(tmp_path / "work", {**TINY, "epochs": 3}, toy_files)
            code = run_hpo(RunOptions(workdir=work, max_events=MAX_EVENTS_N))
            curves = server.storage.intermediate_values(study)
    assert code == 0
    doc = _output(work)
    assert doc == {"status": 0, "loss": pytest.approx(curves[mine.point_id][0]), "pruned": True,
                   "message": "pruned at epoch 1"}, doc
    assert sorted(curves[mine.point_id]) == [0], "the payload reports epoch 1 as step 0 and stops when told"
    assert [step for step, _ in _metric_steps(_run_dir(work), "val_loss")] == [1]
    assert (_run_dir(work) / "tags" / "hepopt.state").read_text() == "pruned"


def _lease(client: Any, study: int, worker_id: str) -> Any:
    deadline = time.monotonic() + PAYLOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        answer = client.ask(study, worker_id)
        if answer.lease is not None:
            return answer.lease
        time.sleep(answer.retry_after or WAIT_POLL_S)
    pytest.fail("no point was leased")


# --- outcome mapping (a stand-in for train) ---------------------------------------------------------


@pytest.fixture
def fake_train(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Replace ``trainer.train`` by a function that calls ``behaviour(on_epoch_end)``."""
    def install(behaviour: Any) -> None:
        def train(params: Any, files: Any, workdir: Any, **kwargs: Any) -> Any:
            return behaviour(kwargs["on_epoch_end"])
        monkeypatch.setattr(trainer, "train", train)
    for name in [n for n in os.environ if n.startswith("HEPOPT_")]:
        monkeypatch.delenv(name)
    return install


def _epoch(number: int, loss: float) -> trainer.EpochResult:
    return trainer.EpochResult(epoch=number, train_loss=loss, val_loss=loss, epoch_time=1.0, train_events=8, steps=2)


def _run_in_process(tmp_path: Path, toy_files: list[Path]) -> tuple[int, dict[str, Any]]:
    work = _workdir(tmp_path, TINY, toy_files)
    code = run_hpo(RunOptions(workdir=work))
    return code, _output(work)


def test_training_error_is_status_1_with_the_reason(tmp_path: Path, toy_files: list[Path], fake_train: Any) -> None:
    def nan_in_epoch_2(on_epoch_end: Any) -> Any:
        on_epoch_end(_epoch(1, 2.0))
        raise trainer.TrainingError("validation loss is nan")
    fake_train(nan_in_epoch_2)
    code, doc = _run_in_process(tmp_path, toy_files)
    assert code == 1 and doc["status"] == 1 and doc["loss"] is None, doc
    assert doc["message"] == "training failed after epoch 1: validation loss is nan"
    assert (_run_dir(tmp_path) / "tags" / "hepopt.state").read_text() == "failed"


def test_unexpected_error_is_status_1_never_a_success(tmp_path: Path, toy_files: list[Path], fake_train: Any) -> None:
    def crash(on_epoch_end: Any) -> Any:
        raise MemoryError("cannot allocate 12 GiB")
    fake_train(crash)
    code, doc = _run_in_process(tmp_path, toy_files)
    assert code == 1 and doc["status"] == 1, doc
    assert "MemoryError" in doc["message"] and "12 GiB" in doc["message"], doc


def test_non_finite_final_loss_is_a_failure(tmp_path: Path, toy_files: list[Path], fake_train: Any) -> None:
    def nan_result(on_epoch_end: Any) -> Any:
        on_epoch_end(_epoch(1, math.nan))
        return trainer.TrainResult(history=[_epoch(1, math.nan)], final_val_loss=math.nan, stopped_early=False,
                                   resumed_from_epoch=0)
    fake_train(nan_result)
    code, doc = _run_in_process(tmp_path, toy_files)
    assert code == 1 and doc["status"] == 1 and "non-finite" in doc["message"], doc


def test_preempted_is_status_75_and_exit_75(tmp_path: Path, toy_files: list[Path], fake_train: Any) -> None:
    def sigterm(on_epoch_end: Any) -> Any:
        on_epoch_end(_epoch(1, 2.0))
        raise trainer.Preempted("SIGTERM")
    fake_train(sigterm)
    code, doc = _run_in_process(tmp_path, toy_files)
    assert code == EXIT_PREEMPTED == doc["status"] and doc["preempted"] is True, doc
    assert doc["message"].startswith("preempted: SIGTERM; a rerun"), doc


def test_metrics_tarball_name_from_the_environment(tmp_path: Path, toy_files: list[Path], fake_train: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker may pass the task's evaluationMetrics as HEPOPT_EVALUATION_METRICS."""
    def one_epoch(on_epoch_end: Any) -> Any:
        on_epoch_end(_epoch(1, 2.0))
        return trainer.TrainResult(history=[_epoch(1, 2.0)], final_val_loss=2.0, stopped_early=False,
                                   resumed_from_epoch=0)
    fake_train(one_epoch)
    monkeypatch.setenv(runner.METRICS_ENV, "out/metrics.tar.gz")
    code, doc = _run_in_process(tmp_path, toy_files)
    assert code == 0 and doc["loss"] == 2.0, doc
    with tarfile.open(tmp_path / "out" / "metrics.tar.gz") as tar:
        assert any(name.endswith("metrics/val_loss") for name in tar.getnames())


def test_epochs_the_callback_never_saw_are_still_logged(tmp_path: Path, toy_files: list[Path],
                                                        fake_train: Any) -> None:
    """A checkpoint that ends just as SIGTERM comes holds an epoch that was never called back."""
    def resumed(on_epoch_end: Any) -> Any:
        on_epoch_end(_epoch(3, 1.0))
        history = [_epoch(1, 3.0), _epoch(2, 2.0), _epoch(3, 1.0)]
        return trainer.TrainResult(history=history, final_val_loss=1.0, stopped_early=False, resumed_from_epoch=2)
    fake_train(resumed)
    code, doc = _run_in_process(tmp_path, toy_files)
    assert code == 0 and doc["message"] == "trained 3 epoch(s), resumed from epoch 2; final validation loss 1", doc
    assert _metric_steps(_run_dir(tmp_path), "val_loss") == [(1, 3.0), (2, 2.0), (3, 1.0)]


# --- which training files -------------------------------------------------------------------------


def test_input_ds_entries_are_relative_to_the_working_directory(tmp_path: Path, toy_files: list[Path]) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / toy_files[0].name).symlink_to(toy_files[0])
    (tmp_path / "input_ds.json").write_text(json.dumps(["data"]))
    assert runner.training_files(tmp_path / "input_ds.json") == [tmp_path / "data" / toy_files[0].name]


@pytest.mark.parametrize("content", [None, "[]"], ids=["absent", "empty-list"])
def test_absent_or_empty_input_ds_means_the_default_dataset(tmp_path: Path, toy_files: list[Path], fake_train: Any,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            content: str | None) -> None:
    """A worker writes [] for a task without local trainingDS; PanDA may give no file at all."""
    monkeypatch.setenv("HEPOPT_DATA_DIR", str(tmp_path / "cache"))
    seen: list[Path] = []

    def record_files(params: Any, files: Any, workdir: Any, **kwargs: Any) -> Any:
        seen.extend(files)
        kwargs["on_epoch_end"](_epoch(1, 1.0))
        return trainer.TrainResult(history=[_epoch(1, 1.0)], final_val_loss=1.0, stopped_early=False,
                                   resumed_from_epoch=0)
    monkeypatch.setattr(trainer, "train", record_files)
    work = _workdir(tmp_path / "work", TINY)
    if content is not None:
        (work / "input_ds.json").write_text(content)
    assert run_hpo(RunOptions(workdir=work)) == 0, _output(work)
    [manifest] = (tmp_path / "cache").glob("mlpf_toy/*/manifest.json")
    assert [p.name for p in seen] == json.loads(manifest.read_text())["files"]


def test_a_metrics_tarball_that_cannot_be_written_keeps_the_loss_and_says_so(tmp_path: Path, toy_files: list[Path],
                                                                             fake_train: Any) -> None:
    def one_epoch(on_epoch_end: Any) -> Any:
        on_epoch_end(_epoch(1, 2.0))
        return trainer.TrainResult(history=[_epoch(1, 2.0)], final_val_loss=2.0, stopped_early=False,
                                   resumed_from_epoch=0)
    fake_train(one_epoch)
    work = _workdir(tmp_path, TINY, toy_files)
    code = run_hpo(RunOptions(workdir=work, metrics_tarball="input.json/metrics.tgz"))  # a file is no directory
    doc = _output(work)
    assert code == 0 and doc["loss"] == 2.0, doc
    assert "warning: MLflow logs not finalised" in doc["message"], doc
