"""How studies and points look on a terminal (rich tables) and in files (JSON, CSV).

Everything here works on the JSON objects of the REST API (docs/REST_API.md), so ``hepopt status``
against a remote service and ``hepopt run`` on an embedded one print the same thing.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

FINAL_STATES = ("done", "pruned", "failed")
#: Width used when output goes to a file or pipe (rich would assume 80 columns and truncate tables).
PIPE_WIDTH = 160
COUNT_COLUMNS = ("new", "running", "done", "pruned", "failed")
POINT_COLUMNS = ("number", "id", "state", "attempt", "loss", "worker_id", "message", "created_at", "finished_at")
#: Longest message shown in a table cell; JSON and CSV keep the whole text.
MESSAGE_WIDTH = 60
STATE_STYLES = {"done": "green", "pruned": "yellow", "failed": "red", "running": "cyan", "new": "dim",
                "completed": "green", "cancelled": "yellow"}


def console(soft_wrap: bool = False) -> Console:
    """A console for the terminal, or a wide one for files and pipes so tables keep their columns."""
    out = Console(soft_wrap=soft_wrap)
    return out if out.is_terminal else Console(soft_wrap=soft_wrap, width=PIPE_WIDTH)


def format_loss(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.6g}"


def format_value(value: Any) -> str:
    """A hyperparameter value, short: floats with 4 significant digits, everything else as JSON."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_time(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _styled(state: str) -> str:
    style = STATE_STYLES.get(state)
    return f"[{style}]{state}[/{style}]" if style else state


def steering_text(study: dict[str, Any]) -> str:
    steering = study.get("steering") or {}
    status = steering.get("status", "-")
    error = steering.get("error")
    return f"{status}: {error}" if error else status


def studies_table(studies: Sequence[dict[str, Any]]) -> Table:
    """One row per study: state, points by state, best loss, steering."""
    table = Table(title="studies")
    for column in ("id", "name", "state", *COUNT_COLUMNS, "best loss", "steering"):
        table.add_column(column, justify="right" if column in (*COUNT_COLUMNS, "id", "best loss") else "left")
    for study in studies:
        counts = study.get("counts") or {}
        best = study.get("best") or {}
        table.add_row(str(study["id"]), study.get("name") or "-", _styled(study["state"]),
                      *(str(counts.get(c, 0)) for c in COUNT_COLUMNS), format_loss(best.get("loss")),
                      steering_text(study))
    return table


def study_table(study: dict[str, Any]) -> Table:
    """One study in detail: state, budget, counts, best point, steering status and error."""
    task = study.get("task") or {}
    counts = study.get("counts") or {}
    best = study.get("best")
    table = Table(title=f"study {study['id']} {study.get('name') or ''}".strip(), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("state", _styled(study["state"]) + (f" ({study['message']})" if study.get("message") else ""))
    table.add_row("owner", str(study.get("owner", "-")))
    finished = sum(counts.get(s, 0) for s in FINAL_STATES)
    table.add_row("points", f"{finished} finished of maxPoints {task.get('maxPoints', '?')}")
    table.add_row("by state", "  ".join(f"{_styled(s)} {counts.get(s, 0)}" for s in COUNT_COLUMNS))
    jobs_limit = task.get("maxEvaluationJobs") or 2 * int(task.get("maxPoints", 0))
    table.add_row("evaluation jobs", f"{counts.get('evaluation_jobs', 0)} of {jobs_limit}")
    table.add_row("best loss", format_loss(best.get("loss")) if best else "-")
    if best:
        table.add_row("best point", f"#{best['number']} " + params_text(best.get("params") or {}))
    table.add_row("steering", steering_text(study))
    table.add_row("created", format_time(study.get("created_at")))
    table.add_row("updated", format_time(study.get("updated_at")))
    return table


def params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in params.items())


def param_names(points: Sequence[dict[str, Any]]) -> list[str]:
    """Hyperparameter names in first-seen order (segmented studies may differ between points)."""
    names: dict[str, None] = {}
    for point in points:
        for name in point.get("params") or {}:
            names.setdefault(name, None)
    return list(names)


def points_table(points: Sequence[dict[str, Any]], title: str = "points") -> Table:
    names = param_names(points)
    table = Table(title=title)
    for column in ("#", "state", "attempt", "loss", *names, "message"):
        table.add_column(column, justify="right" if column in ("#", "attempt", "loss") else "left",
                         overflow="fold")
    for point in points:
        params = point.get("params") or {}
        message = (point.get("message") or "")[:MESSAGE_WIDTH]
        table.add_row(str(point["number"]), _styled(point["state"]), str(point.get("attempt", 0)),
                      format_loss(point.get("loss")), *(format_value(params.get(n, "")) for n in names), message)
    return table


def points_json(points: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(points), indent=2) + "\n"


def points_csv(points: Sequence[dict[str, Any]]) -> str:
    """One row per point: the point's fields, then one column per hyperparameter (prefixed on a clash)."""
    names = param_names(points)
    headers = [*POINT_COLUMNS, *(f"param_{n}" if n in POINT_COLUMNS else n for n in names)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    for point in points:
        params = point.get("params") or {}
        row = [_csv_cell(point.get(c)) for c in POINT_COLUMNS]
        row += [_csv_cell(params.get(n)) for n in names]
        writer.writerow(row)
    return buffer.getvalue()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def best_points(points: Sequence[dict[str, Any]], direction: str, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` best DONE points for the study's direction, best first."""
    done = [p for p in points if p["state"] == "done" and p.get("loss") is not None]
    done.sort(key=lambda p: p["loss"], reverse=direction == "maximize")
    return done[:limit]


def point_table(point: dict[str, Any], title: str) -> Table:
    """One point in detail (``hepopt best``)."""
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("loss", format_loss(point.get("loss")))
    table.add_row("point", f"#{point['number']} (id {point['id']}, attempt {point.get('attempt', 0)})")
    for name, value in (point.get("params") or {}).items():
        table.add_row(name, format_value(value))
    table.add_row("worker", str(point.get("worker_id") or "-"))
    table.add_row("finished", format_time(point.get("finished_at")))
    if point.get("message"):
        table.add_row("message", point["message"])
    return table
