"""Benchmark mode: the HEPscore result.json of DESIGN.md §4 from a real (tiny) training, twice, same loss."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from evaluation_container.__main__ import main
from evaluation_container.benchmark import (
    BenchmarkOptions,
    configure_devices,
    hepscore_report,
    run_benchmark,
)
from hepopt.errors import SpecError

SCORES = {"mean_throughput", "mean_epoch_time"}
STATS = {"num_epochs", "epoch_times", "train_start", "train_stop", "train_time", "GPU", "CPU", "train_set_size",
         "batch_size_per_device", "batch_size_total", "steps_per_epoch", "events_per_epoch", "throughput_per_epoch"}
#: 10 events of 30-60 elements: 8 train in 2 batches of 4, 2 validate.
TINY = ["--epochs", "2", "--batch-size", "4", "--events", "10", "--min-elements", "30", "--max-elements", "60"]
TRAIN_EVENTS, STEPS = 8, 2


@pytest.mark.slow
def test_result_json_has_the_hepscore_layout_and_two_runs_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEPOPT_DATA_DIR", str(tmp_path / "cache"))
    out = tmp_path / "result.json"
    before = time.time()
    assert main(["benchmark", *TINY, "--out", str(out)]) == 0
    after = time.time()
    report = json.loads(out.read_text())
    assert set(report) == {"wl-scores", "wl-stats"}
    assert set(report["wl-scores"]) == SCORES and set(report["wl-stats"]) == STATS
    _assert_sane(report, before, after)

    printed = re.search(r"final validation loss (\S+)", capsys.readouterr().out)
    assert printed, "the command prints the final loss"
    again = run_benchmark(BenchmarkOptions(epochs=2, batch_size=4, events=10, out=tmp_path / "again.json",
                                           min_elements=30, max_elements=60))
    assert f"{again.final_val_loss:.6g}" == printed.group(1), "fixed seeds: the same loss on the same platform"
    assert 0 < again.history[-1].padded_fraction < 1


def _assert_sane(report: dict, before: float, after: float) -> None:
    scores, stats = report["wl-scores"], report["wl-stats"]
    assert stats["num_epochs"] == len(stats["epoch_times"]) == len(stats["throughput_per_epoch"]) == 2
    assert all(t > 0 for t in stats["epoch_times"])
    assert stats["throughput_per_epoch"] == pytest.approx([TRAIN_EVENTS / t for t in stats["epoch_times"]])
    assert scores["mean_throughput"] == pytest.approx(stats["throughput_per_epoch"][1]), "first epoch left out"
    assert scores["mean_epoch_time"] == pytest.approx(stats["epoch_times"][1])
    assert before <= stats["train_start"] < stats["train_stop"] <= after
    assert stats["train_time"] == pytest.approx(stats["train_stop"] - stats["train_start"])
    assert stats["train_time"] >= sum(stats["epoch_times"])
    assert stats["GPU"] == 0 and stats["CPU"] == len(os.sched_getaffinity(0))
    assert stats["train_set_size"] == stats["events_per_epoch"] == TRAIN_EVENTS
    assert stats["batch_size_per_device"] == stats["batch_size_total"] == 4
    assert stats["steps_per_epoch"] == STEPS


def test_means_leave_the_first_epoch_out() -> None:
    history = [SimpleNamespace(epoch_time=t, train_events=40, steps=10) for t in (10.0, 2.0, 4.0)]
    report = hepscore_report(history, started=100.0, stopped=120.0, gpus=2, batch_size_per_device=4)
    assert report["wl-scores"] == {"mean_throughput": pytest.approx((20 + 10) / 2), "mean_epoch_time": 3.0}
    assert report["wl-stats"]["batch_size_total"] == 8 and report["wl-stats"]["train_time"] == 20.0
    with pytest.raises(ValueError, match="at least 2 epochs"):
        hepscore_report(history[:1], 0.0, 1.0, 0, 4)


def test_more_gpus_than_visible_is_refused() -> None:
    with pytest.raises(SpecError, match="--gpus: asked for 1 GPU"):
        configure_devices(1)


@pytest.mark.parametrize(("args", "named"), [
    (["--epochs", "1", "--batch-size", "4", "--events", "10"], "--epochs"),
    (["--epochs", "2", "--batch-size", "0", "--events", "10"], "--batch-size"),
    (["--epochs", "2", "--batch-size", "4", "--events", "1"], "--events"),
])
def test_bad_options_exit_2_naming_the_option(tmp_path: Path, args: list[str], named: str) -> None:
    result = subprocess.run([sys.executable, "-m", "evaluation_container", "benchmark", *args, "--out",
                             str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and named in result.stderr, result.stderr
    assert not (tmp_path / "r.json").exists()
