"""MLflow logging into ./mlruns (a real MLflow file store in a temporary directory; no training)."""

import tarfile
from pathlib import Path

import pytest

from evaluation_container.tracking import (
    MLRUNS_DIR,
    RunLogger,
    epoch_metrics,
    tar_directory,
    tracking_uri,
)
from evaluation_container.trainer import EpochResult


def _epoch(number: int, val_loss: float) -> EpochResult:
    return EpochResult(epoch=number, train_loss=val_loss + 0.5, val_loss=val_loss,
                       head_losses={"cls": val_loss / 2, "pt": val_loss / 4},
                       physics={"eff_ch_had": 0.8, "pt_resolution": 0.1}, epoch_time=2.0, train_events=40, steps=10,
                       padded_fraction=0.25)


def _run_dir(workdir: Path) -> Path:
    [meta] = [p for p in (workdir / MLRUNS_DIR).glob("*/*/meta.yaml")]
    return meta.parent


def test_epoch_metrics_hold_totals_heads_physics_and_speed() -> None:
    metrics = epoch_metrics(_epoch(3, 1.0))
    assert metrics == {"train_loss": 1.5, "val_loss": 1.0, "epoch_time": 2.0, "padded_fraction": 0.25,
                       "train_events_per_s": 20.0, "val_loss_cls": 0.5, "val_loss_pt": 0.25, "eff_ch_had": 0.8,
                       "pt_resolution": 0.1}


def test_run_lands_in_workdir_mlruns_even_if_another_uri_is_configured(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "elsewhere").as_uri())
    logger = RunLogger.open(tmp_path, "point-7", tags={"hepopt.trial": "7"})
    logger.log_params({"lr": 0.001, "bin_size": 64})
    for number, loss in ((1, 2.0), (2, 1.5)):
        logger.log_epoch(_epoch(number, loss))
    logger.finish("done", 1.5, step=2)

    run = _run_dir(tmp_path)
    assert not (tmp_path / "elsewhere").exists()
    assert (run / "params" / "lr").read_text() == "0.001"
    assert (run / "tags" / "hepopt.trial").read_text() == "7"
    assert (run / "tags" / "hepopt.state").read_text() == "done"
    lines = (run / "metrics" / "val_loss").read_text().split("\n")
    assert [line.split()[1:] for line in lines if line] == [["2.0", "1"], ["1.5", "2"]]
    assert (run / "metrics" / "val_loss_cls").is_file() and (run / "metrics" / "eff_ch_had").is_file()
    assert (run / "metrics" / "final_val_loss").read_text().split()[1] == "1.5"
    assert logger.client.get_run(logger.run_id).info.status == "FINISHED"


def test_a_preempted_run_is_continued_not_duplicated(tmp_path: Path) -> None:
    first = RunLogger.open(tmp_path, "point-1")
    first.log_params({"lr": 0.01})
    first.log_epoch(_epoch(1, 3.0))
    first.finish("preempted", None, step=1)
    assert first.client.get_run(first.run_id).info.status == "KILLED"

    again = RunLogger.open(tmp_path, "point-1")
    assert again.resumed and again.run_id == first.run_id
    again.log_params({"lr": 0.01})
    again.log_epoch(_epoch(2, 2.0))
    again.finish("done", 2.0, step=2)
    history = again.client.get_metric_history(again.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0)]
    assert again.client.get_run(again.run_id).info.status == "FINISHED"

    third = RunLogger.open(tmp_path, "point-1")
    assert not third.resumed and third.run_id != first.run_id, "a finished run is never reopened"


def test_tracking_uri_is_a_file_uri_of_mlruns(tmp_path: Path) -> None:
    assert tracking_uri(tmp_path) == (tmp_path / "mlruns").resolve().as_uri()
    assert tracking_uri(tmp_path).startswith("file:///")


def test_tarball_holds_the_directory(tmp_path: Path) -> None:
    source = tmp_path / MLRUNS_DIR / "1" / "abc"
    source.mkdir(parents=True)
    (source / "meta.yaml").write_text("x: 1\n")
    target = tar_directory(tmp_path / MLRUNS_DIR, tmp_path / "out" / "metrics.tgz")
    with tarfile.open(target) as tar:
        assert "mlruns/1/abc/meta.yaml" in tar.getnames()
    assert [p.name for p in target.parent.iterdir()] == ["metrics.tgz"], "no temporary file left behind"
