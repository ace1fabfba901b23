"""The orchestrator's subcommands of ``hepopt``: serve, worker, run, submit, status, points, best, cancel, token.

``register(subparsers)`` only builds argparse parsers; every handler imports what it needs when it
runs, so ``hepopt --help`` never loads FastAPI or SQLAlchemy. Exit codes are the same for every
subcommand so that scripts can rely on them (see EXIT_CODES).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hepopt.errors import ClientError, Forbidden, InvalidRequest, NotFound, SpecError, Unauthorized

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_INTERRUPTED = 130
EXIT_CODES = ("exit codes: 0 ok, 1 internal error, 2 bad input or usage (invalid task, 422),\n"
              "            3 authentication or permission (401/403), 4 not found (404)")
ENV_URL = "HEPOPT_URL"
ENV_TOKEN = "HEPOPT_TOKEN"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
#: Libraries whose INFO lines say nothing a user needs (schema plugins, per-request connection chatter).
QUIET_LOGGERS = ("alembic", "urllib3")

Handler = Callable[[argparse.Namespace], int]


# -- shared helpers ---------------------------------------------------------------------------------
def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``2h``, ``30d`` or ``1w`` (argparse type)."""
    match = DURATION_PATTERN.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 90s, 30m, 2h, 30d")
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


def positive_int(text: str) -> int:
    """An integer of at least 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def database_url(text: str) -> str:
    """A SQLAlchemy URL from ``--db``: a URL as given, a plain path as a SQLite file."""
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def exit_code(exc: BaseException) -> int:
    """The documented exit code for an error that reached the command line."""
    if isinstance(exc, (SpecError, InvalidRequest)):
        return EXIT_BAD_INPUT
    if isinstance(exc, (Unauthorized, Forbidden)):
        return EXIT_AUTH
    if isinstance(exc, NotFound):
        return EXIT_NOT_FOUND
    return EXIT_INTERNAL


def _guarded(handler: Handler) -> Handler:
    """Turn errors into one line on stderr and the documented exit code (a traceback only for bugs)."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except KeyboardInterrupt:
            print("hepopt: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (SpecError, ClientError, UsageError) as exc:
            print(f"hepopt {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT if isinstance(exc, UsageError) else exit_code(exc)
        except Exception:
            traceback.print_exc()
            print(f"hepopt {args.command}: internal error (traceback above)", file=sys.stderr)
            return EXIT_INTERNAL

    return run


class UsageError(Exception):
    """A command line that parsed but cannot be used (e.g. no orchestrator URL anywhere)."""


def _client(args: argparse.Namespace) -> Any:
    from hepopt.client import Client

    url = args.url or os.environ.get(ENV_URL)
    token = args.token or os.environ.get(ENV_TOKEN)
    if not url or not token:
        raise UsageError(f"give --url and --token, or set {ENV_URL} and {ENV_TOKEN}")
    return Client(url, token)


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"orchestrator URL, e.g. https://hpo.example.org:8443 (default: ${ENV_URL})")
    parser.add_argument("--token", help=f"bearer token (default: ${ENV_TOKEN}; prefer the variable: "
                        "a token on the command line shows in `ps`)")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT, stream=sys.stderr)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _parser(sub: Any, name: str, help_text: str, description: str, example: str) -> argparse.ArgumentParser:
    epilog = f"example:\n  {example}\n\n{EXIT_CODES}"
    return sub.add_parser(name, help=help_text, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


# -- serve ----------------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    from orchestrator.config import Settings
    from orchestrator.server import run_server

    _configure_logging(args.log_level)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("give both --tls-cert and --tls-key, or neither")
    options: dict[str, Any] = {"db_url": database_url(args.db) if args.db else "",
                               "allow_steering_exec": args.allow_steering_exec}
    if args.data_dir:
        options["data_dir"] = Path(args.data_dir)
    if args.reaper_interval:
        options["reaper_interval"] = args.reaper_interval
    if args.retry_after:
        options["retry_after"] = args.retry_after
    run_server(Settings(**options), host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key,
               log_level=args.log_level, access_log=args.access_log, workers=args.workers)
    return EXIT_OK


def _add_serve(sub: Any) -> None:
    parser = _parser(sub, "serve", "run the orchestrator REST service",
                     "Run the orchestrator: REST API, point queue with leases, steering in the background, "
                     "checkpoint store. Create a user token first with `hepopt token create`.",
                     "hepopt serve --db postgresql://hepopt@dbhost/hepopt --host 0.0.0.0 --port 8443 "
                     "--tls-cert cert.pem --tls-key key.pem --data-dir /srv/hepopt")
    parser.add_argument("--db", help="database URL (sqlite:///path.db, postgresql://user@host/db) or a SQLite "
                        "file path (default: hepopt.db in --data-dir)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTPS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--data-dir", help="where checkpoints (and the default SQLite database) are kept "
                        "(default: ./hepopt-data)")
    parser.add_argument("--allow-steering-exec", action="store_true",
                        help="run the steeringExec command of tasks on this server (arbitrary code from any "
                        "token holder: only for a private server); otherwise steering runs in-process")
    parser.add_argument("--reaper-interval", type=parse_duration,
                        help="how often expired leases go back to the queue (default: 10s)")
    parser.add_argument("--retry-after", type=parse_duration,
                        help="how long a worker is told to wait when no point is ready (default: 2s)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--access-log", action="store_true",
                        help="log every request (off by default: at worker rates it costs a large share of the CPU)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="server processes sharing the port (default: 1); more use more CPU cores. Counters "
                        "of /metrics are then per process")
    parser.set_defaults(func=_guarded(_serve))


# -- worker ---------------------------------------------------------------------------------------
def _worker(args: argparse.Namespace) -> int:
    from orchestrator.worker import WorkerOptions, run_worker

    _configure_logging(args.log_level)
    token = args.token or os.environ.get(ENV_TOKEN)
    url = args.url or os.environ.get(ENV_URL)
    if not url or not token:
        raise UsageError(f"give --url and --token, or set {ENV_URL} and {ENV_TOKEN}")
    options = WorkerOptions(url=url, token=token, study_id=args.study, workdir=Path(args.workdir).resolve(),
                            task_dir=Path(args.task_dir).resolve(), max_points=args.max_points,
                            walltime_s=args.walltime, grace_s=args.grace)
    if args.worker_id:
        options.worker_id = args.worker_id
    return run_worker(options)


def _add_worker(sub: Any) -> None:
    parser = _parser(sub, "worker", "lease points of a study and evaluate them (a pilot)",
                     "Ask the orchestrator for points and run the task's evaluationExec on each in a fresh "
                     "working directory (PanDA runHPO contract: input.json in, output.json out), with "
                     "heartbeats, periodic checkpoint uploads and restore on retry. Stops before a point "
                     "that would not fit into --walltime (judged by the longest point so far); on SIGTERM "
                     "it stops the payload, uploads its checkpoint, releases the point and exits 0.",
                     "HEPOPT_TOKEN=hpo_... hepopt worker --url https://hpo.example.org:8443 --study 3 "
                     "--walltime 2h --workdir /scratch/hepopt")
    _add_connection(parser)
    parser.add_argument("--study", type=int, required=True, help="study id")
    parser.add_argument("--max-points", type=positive_int, help="evaluate at most this many points, then exit")
    parser.add_argument("--walltime", type=parse_duration,
                        help="time this worker may run from its start (e.g. 2h, 90m): no point is started that "
                        "would not fit, judged by the longest point so far x 1.2")
    parser.add_argument("--workdir", default="hepopt-work", help="parent of the per-point working directories "
                        "(default: ./hepopt-work)")
    parser.add_argument("--task-dir", default=".", help="directory that relative files in evaluationExec are "
                        "found in (default: the current directory)")
    parser.add_argument("--worker-id", help="name shown on leased points (default: HOST-PID)")
    parser.add_argument("--grace", type=parse_duration, default=10.0,
                        help="time the payload gets between SIGTERM and SIGKILL (default: 10s)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.set_defaults(func=_guarded(_worker))


# -- run ------------------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    from orchestrator.local_run import LocalRunOptions, run_local

    options = LocalRunOptions(task_path=Path(args.task), workers=args.workers, db_path=args.db,
                              data_dir=args.data_dir, run_root=Path(args.runs_dir), name=args.name)
    return run_local(options)


def _add_run(sub: Any) -> None:
    parser = _parser(sub, "run", "run a whole study on this machine (embedded orchestrator + local workers)",
                     "Start an embedded orchestrator on SQLite, submit the task, start local workers and show "
                     "progress until the study completes; then print the best points and where the results "
                     "are. Relative files in evaluationExec are found next to the task file, and `python` is "
                     "this interpreter. Ctrl-C stops the workers cleanly (points are released, checkpoints "
                     "kept); exit 0 when the study completed.",
                     "hepopt run examples/quadratic/task.json --workers 4")
    parser.add_argument("task", help="task JSON file")
    parser.add_argument("--workers", type=positive_int,
                        help="local workers (default: the task's nParallelEvaluation)")
    parser.add_argument("--db", help="SQLite database file (default: RUN_FOLDER/hepopt.db)")
    parser.add_argument("--data-dir", help="checkpoint store (default: RUN_FOLDER/data)")
    parser.add_argument("--runs-dir", default="runs", help="where run folders are created (default: ./runs)")
    parser.add_argument("--name", help="study name (default: the task file's name)")
    parser.set_defaults(func=_guarded(_run))


# -- submit ---------------------------------------------------------------------------------------
def _submit(args: argparse.Namespace) -> int:
    from hepopt.task import load_task

    task = load_task(args.task)
    with _client(args) as client:
        study = client.create_study(task.to_json(), name=args.name or Path(args.task).stem)
        worker_token = client.create_worker_token(study["id"]) if args.worker_token else None
    if args.quiet:
        print(study["id"])
        return EXIT_OK
    print(f"study {study['id']} ({study['name']}) created: {task.maxPoints} points, method {task.hepopt.method}")
    if worker_token:
        print(f"worker token (shown once): {worker_token}")
    print(f"start workers with: HEPOPT_TOKEN=<worker token> hepopt worker --url URL --study {study['id']}")
    return EXIT_OK


def _add_submit(sub: Any) -> None:
    parser = _parser(sub, "submit", "submit a task to a running orchestrator",
                     "Validate a task JSON here (searchSpaceFile is inlined) and create a study on the "
                     "orchestrator; prints the study id.",
                     "HEPOPT_URL=https://hpo.example.org:8443 HEPOPT_TOKEN=hpo_... hepopt submit task.json "
                     "--worker-token")
    parser.add_argument("task", help="task JSON file")
    _add_connection(parser)
    parser.add_argument("--name", help="study name (default: the task file's name)")
    parser.add_argument("--worker-token", action="store_true", help="also mint and print a worker token")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the study id")
    parser.set_defaults(func=_guarded(_submit))


# -- status, points, best, cancel -----------------------------------------------------------------
def _console() -> Any:
    from orchestrator.display import console

    return console()


def _status(args: argparse.Namespace) -> int:
    from orchestrator import display

    with _client(args) as client:
        if args.study is None:
            _console().print(display.studies_table(client.list_studies()))
        else:
            _console().print(display.study_table(client.get_study(args.study)))
    return EXIT_OK


def _points(args: argparse.Namespace) -> int:
    from orchestrator import display

    with _client(args) as client:
        points = client.points(args.study, state=args.state)
    if args.format == "json":
        sys.stdout.write(display.points_json(points))
    elif args.format == "csv":
        sys.stdout.write(display.points_csv(points))
    else:
        _console().print(display.points_table(points, title=f"study {args.study}: {len(points)} point(s)"))
    return EXIT_OK


def _best(args: argparse.Namespace) -> int:
    import json

    from orchestrator import display

    with _client(args) as client:
        point = client.best(args.study)
    if point is None:
        print(f"study {args.study}: no point is done yet", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.format == "json":
        print(json.dumps(point, indent=2))
    else:
        _console().print(display.point_table(point, title=f"best point of study {args.study}"))
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        study = client.cancel(args.study)
    print(f"study {study['id']} is {study['state']}: running points may still finish, no new point is leased")
    return EXIT_OK


def _add_queries(sub: Any) -> None:
    status = _parser(sub, "status", "show studies, or one study in detail",
                     "Without STUDY: one line per own study. With STUDY: state, points by state, best loss, "
                     "steering status and its last error.", "hepopt status 3")
    status.add_argument("study", type=int, nargs="?", help="study id")
    _add_connection(status)
    status.set_defaults(func=_guarded(_status))

    points = _parser(sub, "points", "list the points of a study",
                     "List a study's points with their state, attempts, loss and hyperparameters.",
                     "hepopt points 3 --state done --format csv > points.csv")
    points.add_argument("study", type=int, help="study id")
    points.add_argument("--format", choices=("table", "json", "csv"), default="table", help="(default: table)")
    points.add_argument("--state", choices=("new", "running", "done", "pruned", "failed"), help="only this state")
    _add_connection(points)
    points.set_defaults(func=_guarded(_points))

    best = _parser(sub, "best", "show the best point of a study",
                   "The DONE point with the best loss (exit 4 while none is done).", "hepopt best 3 --format json")
    best.add_argument("study", type=int, help="study id")
    best.add_argument("--format", choices=("table", "json"), default="table", help="(default: table)")
    _add_connection(best)
    best.set_defaults(func=_guarded(_best))

    cancel = _parser(sub, "cancel", "cancel a study",
                     "Stop leasing points of a study; points already running may still report.", "hepopt cancel 3")
    cancel.add_argument("study", type=int, help="study id")
    _add_connection(cancel)
    cancel.set_defaults(func=_guarded(_cancel))


# -- token ----------------------------------------------------------------------------------------
def _token_create(args: argparse.Namespace) -> int:
    import time

    from orchestrator.storage import NotFoundError, open_storage

    storage = open_storage(database_url(args.db))
    try:
        expires_at = time.time() + args.expires if args.expires else None
        try:
            secret = storage.create_token(args.user, study_id=args.study, expires_at=expires_at)
        except NotFoundError as exc:
            raise NotFound(str(exc)) from None
    finally:
        storage.close()
    scope = f"workers of study {args.study}" if args.study is not None else f"user {args.user}"
    print(f"token for {scope}, shown once:", file=sys.stderr)
    print(secret)
    return EXIT_OK


def _add_token(sub: Any) -> None:
    parser = sub.add_parser("token", help="manage bearer tokens (admin, on the database)",
                            description="Administer tokens directly on the orchestrator's database.")
    tokens = parser.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = _parser(tokens, "create", "mint a token for a user or for one study's workers",
                     "Mint a bearer token directly in the database (no server needed). The secret is printed "
                     "once on stdout; only its hash is stored.",
                     "hepopt token create --user alice --expires 30d --db sqlite:///hepopt-data/hepopt.db")
    create.add_argument("--user", required=True, help="user the token acts for")
    create.add_argument("--study", type=int, help="restrict the token to the workers of this study of the user")
    create.add_argument("--expires", type=parse_duration, help="lifetime, e.g. 12h, 30d (default: never)")
    create.add_argument("--db", required=True, help="database URL or SQLite file path")
    create.set_defaults(func=_guarded(_token_create))


def register(sub: Any) -> None:
    """Add the orchestrator's subcommands to the ``hepopt`` parser's subparsers."""
    _add_serve(sub)
    _add_worker(sub)
    _add_run(sub)
    _add_submit(sub)
    _add_queries(sub)
    _add_token(sub)
