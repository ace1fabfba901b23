"""Run a task the way iDDS/PanDA would, on this machine: steering command, then one payload per point.

Each iteration writes ``idds_input.json`` with every point so far (null loss while pending),
substitutes %IN/%OUT/%NUM_POINTS/%MAX_POINTS into the task's ``steeringExec``, runs it, then runs
``evaluationExec`` for each new point in its own working directory (``input.json`` in,
``output.json`` out). It is the reference loop the containers must satisfy, and the quickest way to
check a steering or evaluation container before submitting to the Grid.

    python examples/quadratic/idds_loop.py [TASK_JSON] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hepopt.task import Task, load_task
from orchestrator.steering import steer_exec
from orchestrator.worker import payload_argv
from steering_container.api import Observation

HERE = Path(__file__).resolve().parent
SHOWN_BEST = 5
#: Wall-clock limit of one steering command.
STEERING_TIMEOUT_S = 600.0


def evaluate(task: Task, point: dict, rundir: Path, task_dir: Path) -> float | None:
    """Run the payload on one point in its own directory; the loss, or None when it failed."""
    rundir.mkdir(parents=True)
    (rundir / task.evaluationInput).write_text(json.dumps(point))
    subprocess.run(payload_argv(task.evaluationExec, task_dir, rundir), cwd=rundir, check=False)
    output = rundir / task.evaluationOutput
    result = json.loads(output.read_text()) if output.exists() else {"status": 1}
    return result.get("loss") if result.get("status") == 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", nargs="?", default=str(HERE / "task_idds.json"),
                        help="task JSON with a steeringExec (default: the quadratic)")
    parser.add_argument("--workdir", default="runs/idds_loop", help="where the working directories go")
    args = parser.parse_args()
    task = load_task(args.task)
    workdir = Path(args.workdir) / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True)
    console, points, start = Console(), [], time.time()
    task_dir = Path(args.task).resolve().parent
    while len(points) < task.maxPoints:
        history = [Observation(p, loss, "done" if loss is not None else "failed") for p, loss in points]
        new = steer_exec(task, history, task.nPointsPerIteration, STEERING_TIMEOUT_S)
        if not new:
            break
        for point in new:
            loss = evaluate(task, point, workdir / f"point_{len(points):04d}", task_dir)
            points.append([point, loss])
        best = min((p for p in points if p[1] is not None), key=lambda p: p[1], default=None)
        console.print(f"{len(points)}/{task.maxPoints} points, best loss {best[1] if best else '-'}")
    table = Table(title=f"best points ({time.time() - start:.1f} s, results in {workdir})")
    table.add_column("loss", justify="right")
    for name in task.space.names:
        table.add_column(name)
    for point, loss in sorted((p for p in points if p[1] is not None), key=lambda p: p[1])[:SHOWN_BEST]:
        table.add_row(f"{loss:.4g}", *(f"{point[n]:.4g}" if isinstance(point[n], float) else str(point[n])
                                       for n in task.space.names))
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
