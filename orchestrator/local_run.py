"""``hepopt run task.json``: a whole study on one machine, the laptop / login-node path of DESIGN.md §1.

An embedded orchestrator (SQLite, loopback only) serves the study; N local ``hepopt worker``
subprocesses evaluate it exactly as pilots on a site would, so what works here works on the Grid.
Everything lands in one run folder::

    runs/<task>-<YYYYmmdd-HHMMSS>/
        hepopt.db          the study, its points, leases and learning curves (SQLite)
        data/              checkpoints
        workers/worker-N/  one working directory per point (input.json, output.json, payload.log)
        workers/worker-N.log
        results.csv        every point at the end

Relative files in ``evaluationExec`` are found next to the task file and ``python`` is this interpreter
(see :mod:`orchestrator.worker`). The task's own ``steeringExec`` is honoured (this server is private),
so a task that runs under iDDS runs here unchanged; without one, steering runs in-process, which is faster.
"""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext as _nothing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.text import Text

from orchestrator import display

#: Workers are told to wait this long when no point is ready: short, steering is local and fast.
LOCAL_RETRY_AFTER_S = 0.5
#: Expired leases return to the queue this often (the embedded database is small).
LOCAL_REAPER_INTERVAL_S = 2.0
#: How often the progress display polls the study.
PROGRESS_INTERVAL_S = 0.5
#: After the study ends, workers get this long to notice and exit; after Ctrl-C, to stop their payload.
WORKER_EXIT_TIMEOUT_S = 15.0
WORKER_STOP_TIMEOUT_S = 30.0
#: When every worker has exited but the study still runs, wait this long for the server to close it.
SETTLE_TIMEOUT_S = 5.0
SHOWN_BEST = 5
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


@dataclass
class LocalRunOptions:
    """What ``hepopt run`` takes on its command line."""

    task_path: Path
    workers: int | None = None
    db_path: str | None = None
    data_dir: str | None = None
    run_root: Path = Path("runs")
    name: str | None = None


@dataclass
class RunFolder:
    """Where one local run keeps its database, checkpoints, workers and results."""

    root: Path
    db: Path
    data: Path

    @property
    def workers(self) -> Path:
        return self.root / "workers"

    @property
    def results(self) -> Path:
        return self.root / "results.csv"


def run_local(options: LocalRunOptions) -> int:
    """Run the study to its end; 0 when it completed, 130 when interrupted, 1 otherwise."""
    from hepopt.task import load_task

    task = load_task(options.task_path)
    name = options.name or study_name(options.task_path)
    folder = make_run_folder(options, name)
    console = display.console(soft_wrap=True)
    n_workers = options.workers or task.nParallelEvaluation
    console.print(f"[bold]hepopt run[/bold] {options.task_path}: {task.maxPoints} points, method "
                  f"{'steeringExec' if task.steeringExec else task.hepopt.method}, {n_workers} worker(s); "
                  f"run folder {folder.root}")
    if n_workers > max(task.nParallelEvaluation, task.minUnevaluatedPoints, task.nPointsPerIteration):
        console.print(f"[yellow]note:[/yellow] {n_workers} workers but steering keeps only "
                      f"max(nParallelEvaluation, minUnevaluatedPoints) points ready: some workers will wait")
    return LocalRun(task, name, folder, n_workers, options.task_path.resolve().parent, console).execute()


def study_name(task_path: Path) -> str:
    """``quadratic-task`` for ``examples/quadratic/task.json``: readable and unique enough per project."""
    parent = task_path.resolve().parent.name
    return f"{parent}-{task_path.stem}" if parent else task_path.stem


def make_run_folder(options: LocalRunOptions, name: str) -> RunFolder:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = options.run_root / f"{name}-{stamp}"
    suffix = 1
    while root.exists():
        suffix += 1
        root = options.run_root / f"{name}-{stamp}-{suffix}"
    root.mkdir(parents=True)
    root = root.resolve()
    db = Path(options.db_path).expanduser().resolve() if options.db_path else root / "hepopt.db"
    data = Path(options.data_dir).expanduser().resolve() if options.data_dir else root / "data"
    return RunFolder(root=root, db=db, data=data)


class LocalRun:
    """One embedded server, one study, N worker processes, and a progress display."""

    def __init__(self, task: Any, name: str, folder: RunFolder, n_workers: int, task_dir: Path,
                 console: Console) -> None:
        self.task = task
        self.name = name
        self.folder = folder
        self.n_workers = n_workers
        self.task_dir = task_dir
        self.console = console
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = time.monotonic()

    def execute(self) -> int:
        from hepopt.client import Client
        from orchestrator.config import Settings
        from orchestrator.server import EmbeddedServer

        settings = Settings(data_dir=self.folder.data, db_url=f"sqlite:///{self.folder.db}",
                            allow_steering_exec=True, retry_after=LOCAL_RETRY_AFTER_S,
                            reaper_interval=LOCAL_REAPER_INTERVAL_S)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            with EmbeddedServer(settings) as server, \
                    Client(server.url, server.storage.create_token(getpass.getuser())) as client:
                study = client.create_study(self.task.to_json(), name=self.name)
                worker_token = client.create_worker_token(study["id"], settings.max_worker_token_seconds)
                try:
                    self._start_workers(server.url, study["id"], worker_token)
                    study = self._watch(client, study["id"])
                except KeyboardInterrupt:
                    self._stop_workers()
                    self._summary(client, client.get_study(study["id"]), interrupted=True)
                    return EXIT_INTERRUPTED
                finally:
                    self._stop_workers()
                self._summary(client, study, interrupted=False)
                return EXIT_OK if study["state"] == "completed" else EXIT_FAILED
        finally:
            signal.signal(signal.SIGTERM, previous)

    # -- workers ----------------------------------------------------------------------------------
    def _start_workers(self, url: str, study_id: int, token: str) -> None:
        self.folder.workers.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HEPOPT_URL": url, "HEPOPT_TOKEN": token}
        for i in range(self.n_workers):
            argv = [sys.executable, "-m", "hepopt", "worker", "--url", url, "--study", str(study_id),
                    "--workdir", str(self.folder.workers / f"worker-{i}"), "--task-dir", str(self.task_dir),
                    "--worker-id", f"local-{i}"]
            with open(self.folder.workers / f"worker-{i}.log", "wb") as log:
                # A session of their own: Ctrl-C reaches only this process, which stops the workers cleanly.
                self.procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, start_new_session=True))

    def _alive(self) -> int:
        return sum(proc.poll() is None for proc in self.procs)

    def _stop_workers(self) -> None:
        """SIGTERM every worker still running (each stops its payload and releases its point), then wait."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _wait_for_workers(self) -> None:
        deadline = time.monotonic() + WORKER_EXIT_TIMEOUT_S
        while self._alive() and time.monotonic() < deadline:
            time.sleep(PROGRESS_INTERVAL_S / 5)

    # -- progress ---------------------------------------------------------------------------------
    def _watch(self, client: Any, study_id: int) -> dict[str, Any]:
        """Show progress until the study leaves the running state (or every worker is gone): a live bar on
        a terminal, one line per change otherwise (logs, CI)."""
        from rich.live import Live

        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[timing]}"), console=self.console)
        bar = progress.add_task("points", total=self.task.maxPoints, timing="")
        live = Live(console=self.console, refresh_per_second=4) if self.console.is_terminal else None
        gone_since: float | None = None
        last_line = ""
        with live or _nothing():
            while True:
                study = client.get_study(study_id)
                line = self._status_line(study)
                if live is not None:
                    live.update(Group(self._advance(progress, bar, study), line))
                elif line.plain != last_line:
                    self.console.print(line)
                    last_line = line.plain
                if study["state"] != "running":
                    break
                if self._alive() == 0:
                    gone_since = gone_since or time.monotonic()
                    if time.monotonic() - gone_since > SETTLE_TIMEOUT_S:
                        self.console.print("[red]every worker has exited but the study is still running; "
                                           f"see the worker logs in {self.folder.workers}[/red]")
                        break
                time.sleep(PROGRESS_INTERVAL_S)
        self._wait_for_workers()
        return study

    def _advance(self, progress: Progress, bar: Any, study: dict[str, Any]) -> Progress:
        finished = _finished(study)
        elapsed = time.monotonic() - self.started
        eta = elapsed / finished * (self.task.maxPoints - finished) if finished else None
        timing = f"elapsed {display.format_duration(elapsed)}  ETA {display.format_duration(eta)}"
        progress.update(bar, completed=finished, timing=timing)
        return progress

    def _status_line(self, study: dict[str, Any]) -> Text:
        counts = study.get("counts") or {}
        best = study.get("best") or {}
        prefix = "" if self.console.is_terminal else f"{_finished(study)}/{self.task.maxPoints} finished  "
        return Text.from_markup(
            f"{prefix}done [green]{counts.get('done', 0)}[/green]  running [cyan]{counts.get('running', 0)}[/cyan]  "
            f"pruned [yellow]{counts.get('pruned', 0)}[/yellow]  failed [red]{counts.get('failed', 0)}[/red]  "
            f"best loss [bold]{display.format_loss(best.get('loss'))}[/bold]  "
            f"workers {self._alive()}/{self.n_workers}  steering {display.steering_text(study)}")

    # -- the end ----------------------------------------------------------------------------------
    def _summary(self, client: Any, study: dict[str, Any], interrupted: bool) -> None:
        points = client.points(study["id"])
        self.folder.results.write_text(display.points_csv(points), encoding="utf-8")
        direction = (study.get("task") or {}).get("hepopt", {}).get("direction", "minimize")
        best = display.best_points(points, direction, SHOWN_BEST)
        elapsed = display.format_duration(time.monotonic() - self.started)
        if best:
            self.console.print(display.points_table(best, title=f"best {len(best)} of {len(points)} points "
                                                    f"({elapsed})"))
        else:
            self.console.print(f"[red]no point finished with a loss[/red]; see the payload logs under "
                               f"{self.folder.workers}")
        state = "interrupted" if interrupted else study["state"]
        reason = f" ({study['message']})" if study.get("message") else ""
        self.console.print(f"study {study['id']} {state}{reason}")
        self.console.print(f"run folder: {self.folder.root}\ndatabase:   {self.folder.db}\n"
                           f"results:    {self.folder.results}\nworkers:    {self.folder.workers}")
        if interrupted:
            self.console.print(f"continue later with `hepopt serve --db {self.folder.db} --data-dir "
                               f"{self.folder.data}` and `hepopt worker --study {study['id']}` (unfinished "
                               "points were released)")


def _finished(study: dict[str, Any]) -> int:
    counts = study.get("counts") or {}
    return sum(counts.get(s, 0) for s in display.FINAL_STATES)


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt
