"""``hepopt run`` of the MLPF example, shrunk to 3 tiny points: embedded orchestrator, TPE steering, two
local workers, and the real evaluation payload training on the default toy dataset."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "mlpf_small" / "task.json"
RUN_TIMEOUT_S = 600
POINTS = 3
#: One tiny model; bin_size 512 pads every toy event (≤ 400 elements) to one shape, so each step traces once.
TINY_FIXED = {"num_graph_layers_id": 1, "num_graph_layers_reg": 1, "dropout": 0.0, "bin_size": 512,
              "output_dim": 16, "weight_decay": 1e-6, "batch_size": 4, "epochs": 2}


def _fixed(value: object) -> dict[str, object]:
    return {"method": "fixed", "dimension": {"value": value}}


def _tiny_task(tmp_path: Path) -> Path:
    """The example with its search space pinned except lr, 3 points, 10 events, and no early stopping (so
    every point must end DONE)."""
    task = json.loads(EXAMPLE.read_text())
    task["searchSpace"].update({name: _fixed(value) for name, value in TINY_FIXED.items()})
    task["evaluationExec"] += " --max-events 10"
    task["maxPoints"] = POINTS
    task["hepopt"]["earlyStopping"] = {"policy": "none"}
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task))
    return path


def test_hepopt_run_of_a_three_point_mlpf_study(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEPOPT_", "MLFLOW_"))}
    env["HEPOPT_DATA_DIR"] = str(tmp_path / "cache")
    runs = tmp_path / "runs"
    result = subprocess.run([sys.executable, "-m", "hepopt", "run", str(_tiny_task(tmp_path)), "--workers", "2",
                             "--runs-dir", str(runs)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    [db] = list(runs.glob("*/hepopt.db"))
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        states = conn.execute("SELECT state, loss FROM points ORDER BY number").fetchall()
    assert [state for state, _ in states] == ["done"] * POINTS, (states, result.stdout)
    assert len({loss for _, loss in states}) == POINTS, "three different lr values give three losses"

    outputs = sorted(db.parent.glob("workers/worker-*/point*/output.json"))
    assert len(outputs) == POINTS
    for output in outputs:
        doc = json.loads(output.read_text())
        assert doc["status"] == 0 and "trained 2 epoch(s)" in doc["message"], doc
        assert "default toy dataset" in (output.parent / "payload.log").read_text()
        with tarfile.open(output.parent / "metrics.tgz") as tar:
            assert any(name.endswith("metrics/val_loss") for name in tar.getnames())
    assert list((tmp_path / "cache").glob("mlpf_toy/*/manifest.json")), "the default dataset was generated"
