"""Real MLPF trainings on a small generated dataset: learning, determinism, checkpoint/resume, preemption.

The two preemption scenarios run the internal entry ``python -m evaluation_container.trainer`` in
real subprocesses, started together at the beginning so that they overlap with the in-process
reference training (TensorFlow start-up and graph tracing dominate a run this small).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from evaluation_container import trainer
from evaluation_container.config import HyperParams
from evaluation_container.data import generate_dataset, load_dataset
from evaluation_container.pipeline import padded_length
from evaluation_container.trainer import EXIT_PREEMPTED, EpochResult, TrainingError, train

REPO = Path(__file__).resolve().parents[2]
SEED = 7
PARAMS = HyperParams(lr=2e-3, num_graph_layers_id=1, num_graph_layers_reg=1, dropout=0.1, bin_size=16,
                     output_dim=16, weight_decay=1e-4, batch_size=8, epochs=2)
N_EVENTS, MAX_ELEMENTS = 64, 256
TRAIN_EVENTS = 51  # 64 events, 20 % (13) for validation
MAX_PADDING = 0.15
MAX_RSS_BYTES = 4 * 2**30  # the small study's memory budget
SUBPROCESS_TIMEOUT = 600


@dataclass
class Run:
    workdir: Path
    history: list[EpochResult]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("mlpf_data")
    return generate_dataset(out, files=1, events_per_file=N_EVENTS, seed=3, min_elements=32,
                            max_elements=MAX_ELEMENTS)


@pytest.fixture(scope="module")
def paused_processes(data, tmp_path_factory):
    """Two trainings in subprocesses that stop after epoch 1 (checkpointed) and wait to be killed."""
    processes = {name: _start_paused(tmp_path_factory.mktemp(name), data) for name in ("sigkill", "sigterm")}
    yield processes
    for process, _ in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def reference(data, paused_processes, tmp_path_factory) -> Run:
    """An uninterrupted in-process training: what every resumed run must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    result = train(PARAMS, data, workdir, seed=SEED)
    return Run(workdir, result.history)


def _start_paused(workdir: Path, data: list[Path]) -> tuple[subprocess.Popen, Path]:
    params = workdir / "input.json"
    params.write_text(json.dumps(PARAMS.to_json()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "evaluation_container.trainer", "--params", str(params), "--data",
               *map(str, data), "--workdir", str(workdir), "--seed", str(SEED), "--pause-after-epoch", "1"]
    stderr = (workdir / "stderr.log").open("w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=stderr, text=True)
    return process, workdir


def _wait_until_paused(process: subprocess.Popen, workdir: Path) -> list[dict]:
    """Epoch results printed before the pause; fails with the child's stderr if it ended instead."""
    printed = []
    for line in process.stdout:
        if line.strip() == "paused":
            return printed
        printed.append(json.loads(line))
    process.wait(timeout=SUBPROCESS_TIMEOUT)
    pytest.fail(f"trainer exited with {process.returncode} before pausing:\n{(workdir / 'stderr.log').read_text()}")


def _checkpoint(workdir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(workdir / trainer.CHECKPOINT_DIR / trainer.CHECKPOINT_FILE) as content:
        arrays = {key: content[key] for key in content.files}
    return json.loads(arrays.pop("meta").tobytes()), arrays


def _assert_same_tensors(workdir: Path, expected: Path) -> None:
    _, got = _checkpoint(workdir)
    _, want = _checkpoint(expected)
    assert got.keys() == want.keys()
    different = [key for key in want if not np.array_equal(got[key], want[key])]
    assert not different, f"{len(different)} of {len(want)} tensors differ, e.g. {different[:3]}"


def _outcome(history: list[EpochResult] | list[dict]) -> list[dict]:
    """An epoch's results without its wall-clock time."""
    entries = [entry if isinstance(entry, dict) else dataclasses.asdict(entry) for entry in history]
    return [{key: value for key, value in entry.items() if key != "epoch_time"} for entry in entries]


# --- learning -------------------------------------------------------------------------------------


def test_training_loss_is_finite_and_decreases(reference):
    first, second = reference.history
    for epoch in (first, second):
        assert math.isfinite(epoch.train_loss) and math.isfinite(epoch.val_loss)
        assert all(math.isfinite(value) for value in epoch.head_losses.values())
    assert second.train_loss < first.train_loss
    assert second.val_loss < first.val_loss
    assert first.val_loss == pytest.approx(sum(first.head_losses.values()))


def test_epoch_results_describe_the_work_done(reference):
    first = reference.history[0]
    assert [epoch.epoch for epoch in reference.history] == [1, 2]
    assert first.train_events == TRAIN_EVENTS
    assert first.steps == math.ceil(TRAIN_EVENTS / PARAMS.batch_size)
    assert 0 < first.padded_fraction < MAX_PADDING
    assert first.epoch_time > 0
    assert set(first.head_losses) == {"cls", "charge", "pt", "eta", "sin_phi", "cos_phi", "energy"}
    for figure in ("eff_ch_had", "fake_ch_had", "eff_photon", "pt_resolution", "e_resolution", "met_response"):
        assert math.isfinite(first.physics[figure]), figure
    assert 0 <= first.physics["eff_ch_had"] <= 1


def test_one_trace_serves_every_padded_length_and_memory_stays_modest(reference, data):
    lengths = {padded_length(len(event), PARAMS.bin_size) for event in load_dataset(data)}
    assert len(lengths) > 5  # events vary, so batches come in many shapes
    compiled = trainer._cache[0]
    assert compiled.train_step.experimental_get_tracing_count() == 1
    assert compiled.eval_step.experimental_get_tracing_count() == 1
    kibibytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the whole test process, TF included
    assert kibibytes * 1024 < MAX_RSS_BYTES


# --- determinism and resume -----------------------------------------------------------------------


def test_two_runs_with_one_seed_give_identical_losses_and_weights(reference, data, tmp_path):
    """Within one process; across processes it is checked by the SIGKILL test (epoch 1 of the child)."""
    again = train(PARAMS, data, tmp_path, seed=SEED)
    assert _outcome(again.history) == _outcome(reference.history)
    _assert_same_tensors(tmp_path, reference.workdir)


def test_sigkill_after_epoch_1_then_resume_ends_with_the_uninterrupted_weights(reference, data, paused_processes):
    process, workdir = paused_processes["sigkill"]
    printed = _wait_until_paused(process, workdir)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=SUBPROCESS_TIMEOUT) == -signal.SIGKILL
    assert _outcome(printed) == _outcome(reference.history[:1]), "a fresh process trained epoch 1 differently"
    meta, _ = _checkpoint(workdir)
    assert (meta["epochs_done"], meta["step_in_epoch"]) == (1, 0)

    resumed = train(PARAMS, data, workdir, seed=SEED)
    assert resumed.resumed_from_epoch == 1
    assert _outcome(resumed.history) == _outcome(reference.history)
    _assert_same_tensors(workdir, reference.workdir)


def test_sigterm_writes_a_mid_epoch_checkpoint_exits_75_and_resumes_exactly(reference, data, paused_processes):
    process, workdir = paused_processes["sigterm"]
    _wait_until_paused(process, workdir)
    process.send_signal(signal.SIGTERM)
    process.stdin.close()  # the child goes on, finishes one step of epoch 2, checkpoints and exits
    assert process.wait(timeout=SUBPROCESS_TIMEOUT) == EXIT_PREEMPTED == 75
    assert "preempted" in (workdir / "stderr.log").read_text()
    meta, _ = _checkpoint(workdir)
    assert (meta["epochs_done"], meta["step_in_epoch"]) == (1, 1)

    resumed = train(PARAMS, data, workdir, seed=SEED)
    assert resumed.resumed_from_epoch == 1
    assert _outcome(resumed.history) == _outcome(reference.history)
    _assert_same_tensors(workdir, reference.workdir)


def test_finished_training_is_answered_from_its_checkpoint(reference, data):
    result = train(PARAMS, data, reference.workdir, seed=SEED)
    assert result.resumed_from_epoch == 2
    assert result.history == reference.history
    assert result.final_val_loss == reference.history[-1].val_loss


def test_more_epochs_continue_a_finished_training(reference, data, tmp_path):
    """How a promoted trial (Hyperband) goes on: same point, larger epoch budget."""
    shutil.copytree(reference.workdir / trainer.CHECKPOINT_DIR, tmp_path / trainer.CHECKPOINT_DIR)
    result = train(PARAMS.model_copy(update={"epochs": 3}), data, tmp_path, seed=SEED)
    assert result.resumed_from_epoch == 2
    assert [epoch.epoch for epoch in result.history] == [1, 2, 3]
    assert _outcome(result.history[:2]) == _outcome(reference.history)


# --- stopping and failing -------------------------------------------------------------------------


def test_callback_returning_true_stops_after_that_epoch(reference, data, tmp_path):
    seen = []
    result = train(PARAMS, data, tmp_path, seed=SEED, on_epoch_end=lambda epoch: seen.append(epoch) or True)
    assert result.stopped_early
    assert [epoch.epoch for epoch in seen] == [1]
    assert _outcome(result.history) == _outcome(reference.history[:1])
    assert _checkpoint(tmp_path)[0]["epochs_done"] == 1


@pytest.mark.parametrize(("change", "what"), [({"lr": 1e-2}, "params"), ({"seed": SEED + 1}, "seed")])
def test_checkpoint_of_another_point_is_refused(reference, data, tmp_path, change, what):
    shutil.copytree(reference.workdir / trainer.CHECKPOINT_DIR, tmp_path / trainer.CHECKPOINT_DIR)
    seed = change.pop("seed", SEED)
    with pytest.raises(TrainingError, match=f"{trainer.CHECKPOINT_FILE} was written with {what}"):
        train(PARAMS.model_copy(update=change), data, tmp_path, seed=seed)


def test_checkpoint_of_other_data_is_refused(reference, data, tmp_path):
    shutil.copytree(reference.workdir / trainer.CHECKPOINT_DIR, tmp_path / trainer.CHECKPOINT_DIR)
    with pytest.raises(TrainingError, match="other data"):
        train(PARAMS.model_copy(update={"epochs": 3}), data, tmp_path, seed=SEED, max_events=40)


def test_non_finite_loss_is_a_training_error(reference, data, tmp_path, monkeypatch):
    real = trainer._compiled

    def diverging(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), train_step=lambda x, y, mask: np.float32("nan"))

    monkeypatch.setattr(trainer, "_compiled", diverging)
    with pytest.raises(TrainingError, match=r"training loss is nan at epoch 1, step 1; lr=0.002"):
        train(PARAMS, data, tmp_path, seed=SEED)


def test_too_few_events_is_a_training_error(data, tmp_path):
    with pytest.raises(TrainingError, match="at least 2 events"):
        train(PARAMS, data, tmp_path, max_events=1)


def test_internal_entry_reports_bad_hyperparameters_with_exit_2(data, tmp_path, capsys):
    params = tmp_path / "input.json"
    params.write_text(json.dumps({"lr": 1e-3, "bin_sise": 16}))
    code = trainer.main(["--params", str(params), "--data", str(data[0]), "--workdir", str(tmp_path)])
    assert code == trainer.EXIT_BAD_INPUT
    assert "bin_sise: unknown key" in capsys.readouterr().err
