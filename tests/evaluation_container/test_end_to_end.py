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
#: Grid order: a learning rate that trains, then two that cannot move the loss in one epoch.
LEARNING_RATES = [3e-3, 1e-7, 1e-8]
TINY_FIXED = {"num_graph_layers_id": 1, "num_graph_layers_reg": 1, "dropout": 0.0, "bin_size": 512,
              "output_dim": 16, "weight_decay": 1e-6, "batch_size": 4, "epochs": 2}


def _fixed(value: object) -> dict[str, object]:
    return {"method": "fixed", "dimension": {"value": value}}


def _tiny_task(tmp_path: Path) -> Path:
    """The example shrunk to 3 grid points run one after another: a good learning rate first, then two
    that barely move the weights. ASHA's one rung (after epoch 1, keep the best half) must therefore let
    the first point finish and prune the other two, whatever the machine's timing."""
    task = json.loads(EXAMPLE.read_text())
    task["searchSpace"] = {name: _fixed(value) for name, value in TINY_FIXED.items()}
    task["searchSpace"]["lr"] = {"method": "categorical", "dimension": {"categories": LEARNING_RATES}}
    task["evaluationExec"] += " --max-events 10"
    task["maxPoints"] = POINTS
    task["hepopt"]["method"] = "grid"
    task["hepopt"]["earlyStopping"] = {"policy": "asha", "gracePeriod": 1, "reductionFactor": 2,
                                       "maxResource": TINY_FIXED["epochs"]}
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task))
    return path


def test_hepopt_run_of_a_three_point_mlpf_study_prunes_the_poor_points(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEPOPT_", "MLFLOW_"))}
    env["HEPOPT_DATA_DIR"] = str(tmp_path / "cache")
    runs = tmp_path / "runs"
    result = subprocess.run([sys.executable, "-m", "hepopt", "run", str(_tiny_task(tmp_path)), "--workers", "1",
                             "--runs-dir", str(runs)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    [db] = list(runs.glob("*/hepopt.db"))
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        states = conn.execute("SELECT state, loss FROM points ORDER BY number").fetchall()
    assert [state for state, _ in states] == ["done", "pruned", "pruned"], (states, result.stdout)
    assert states[0][1] < min(loss for _, loss in states[1:]), states

    outputs = sorted(db.parent.glob("workers/worker-*/point*/output.json"))
    assert len(outputs) == POINTS
    docs = [json.loads(output.read_text()) for output in outputs]
    assert all(doc["status"] == 0 for doc in docs), docs
    messages = sorted(doc["message"] for doc in docs)
    assert messages[:2] == ["pruned at epoch 1"] * 2 and messages[2].startswith("trained 2 epoch(s)"), docs
    for output in outputs:
        assert "default toy dataset" in (output.parent / "payload.log").read_text()
        with tarfile.open(output.parent / "metrics.tgz") as tar:
            assert any(name.endswith("metrics/val_loss") for name in tar.getnames())
    assert list((tmp_path / "cache").glob("mlpf_toy/*/manifest.json")), "the default dataset was generated"
