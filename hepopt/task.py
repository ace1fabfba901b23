"""The task JSON a user submits (DESIGN.md §3.1).

Keys follow phpo's option names so the same file can be given to ``phpo --loadJson``; hepopt's own
settings live under the single key ``hepopt``. Validation is strict (``"10"`` is not an integer) and
refuses unknown keys, so a typo never silently becomes a default. Every problem is reported with its
key path, and nothing downstream sees a task that did not pass here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hepopt.errors import SpecError, join_path
from hepopt.space import SearchSpace

#: Upper limit on ``maxPoints`` and ``maxEvaluationJobs``: larger values are typos, not studies.
MAX_POINTS_LIMIT = 1_000_000
#: Method names the core accepts; the steering container checks nevergrad optimizer names.
METHOD_PATTERN = re.compile(r"^(random|grid|tpe|anneal|nevergrad:[A-Za-z0-9_]+)$")
#: Early-stopping policies the orchestrator knows (more arrive with the stopping-policy issue).
STOPPING_POLICIES = ("none", "median")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EarlyStopping(_Strict):
    """Which policy decides, from intermediate values, that a point should stop early."""

    policy: Literal[STOPPING_POLICIES] = "none"  # type: ignore[valid-type]
    minTrials: int = Field(5, ge=1, description="completed points needed before the rule acts")
    warmupSteps: int = Field(0, ge=0, description="intermediate steps always allowed")


class HepoptOptions(_Strict):
    """hepopt's additions to the phpo task: everything phpo does not know lives here."""

    method: str = "tpe"
    seed: int | None = None
    maxAttempts: int = Field(3, ge=1, le=100)
    leaseSeconds: float = Field(300.0, gt=0, le=7 * 24 * 3600)
    direction: Literal["minimize", "maximize"] = "minimize"
    failedLoss: float | None = Field(None, description="loss recorded for a point that failed for good "
                                     "(iDDS/PanDA use 1e5); None leaves it without a loss")
    earlyStopping: EarlyStopping = EarlyStopping()

    @model_validator(mode="after")
    def _method_known(self) -> HepoptOptions:
        if not METHOD_PATTERN.match(self.method):
            raise ValueError(f"method {self.method!r} is not one of random, grid, tpe, anneal, "
                             "nevergrad:<OptimizerName>")
        return self


class Task(_Strict):
    """A validated task. Build it with :func:`parse_task` or :func:`load_task`."""

    evaluationExec: str = Field(min_length=1)
    evaluationContainer: str | None = None
    evaluationInput: str = "input.json"
    evaluationOutput: str = "output.json"
    evaluationTrainingData: str = "input_ds.json"
    evaluationMeta: str | None = None
    evaluationMetrics: str | None = None
    checkPointToSave: str | None = None
    checkPointToLoad: str | None = None
    checkPointInterval: float = Field(5, gt=0, description="minutes")
    steeringContainer: str | None = None
    steeringExec: str | None = None
    searchSpaceFile: str | None = None
    searchSpace: dict[str, Any] | None = None
    maxPoints: int = Field(10, ge=1, le=MAX_POINTS_LIMIT)
    maxEvaluationJobs: int | None = Field(None, ge=1, le=2 * MAX_POINTS_LIMIT)
    nParallelEvaluation: int = Field(1, ge=1, le=100_000)
    nPointsPerIteration: int = Field(2, ge=1, le=100_000)
    minUnevaluatedPoints: int = Field(0, ge=0, le=100_000)
    maxPointsPerEvaluationJob: int | None = Field(None, ge=1)
    segmentSpecFile: str | None = None
    trainingDS: str | None = None
    site: str | None = None
    outDS: str | None = None
    hepopt: HepoptOptions = HepoptOptions()

    @model_validator(mode="after")
    def _space_given_once(self) -> Task:
        if (self.searchSpace is None) == (self.searchSpaceFile is None):
            raise ValueError("give exactly one of 'searchSpace' (inline) or 'searchSpaceFile'")
        return self

    @property
    def evaluation_jobs_limit(self) -> int:
        """maxEvaluationJobs, defaulting to 2 x maxPoints as phpo does."""
        return self.maxEvaluationJobs or 2 * self.maxPoints

    @property
    def space(self) -> SearchSpace:
        """The parsed search space (the inline one; load_task() inlines a searchSpaceFile)."""
        return SearchSpace.parse(self.searchSpace, "searchSpace")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_phpo(self) -> dict[str, Any]:
        """The phpo-only form: hepopt's block removed, defaults kept explicit."""
        data = self.to_json()
        data.pop("hepopt", None)
        return data


def parse_task(data: Any, source: str | None = None, base_dir: Path | None = None) -> Task:
    """Validate a decoded task; a ``searchSpaceFile`` is read relative to ``base_dir`` and inlined."""
    if not isinstance(data, dict):
        raise SpecError([("", f"a task is a JSON object, got {type(data).__name__}")], source)
    try:
        task = Task.model_validate(data)
    except ValidationError as exc:
        raise SpecError([_location(err) for err in exc.errors()], source) from None
    if task.searchSpaceFile is not None:
        path = Path(task.searchSpaceFile)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        space = read_json(path, what="searchSpaceFile")
        task = task.model_copy(update={"searchSpace": space, "searchSpaceFile": None})
    if not isinstance(task.searchSpace, dict):
        raise SpecError([("searchSpace", "expected a JSON object")], source)
    try:
        task.space  # noqa: B018 - parsing is the validation
    except SpecError as exc:
        raise SpecError(exc.problems, source) from None
    return task


def load_task(path: str | Path) -> Task:
    """Read and validate a task JSON file."""
    path = Path(path)
    return parse_task(read_json(path, what="task"), source=str(path), base_dir=path.parent)


def read_json(path: Path, what: str) -> Any:
    """Decode a JSON file; a missing, empty or malformed file raises SpecError with file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([("", f"{what} file not found")], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([("", f"cannot read {what} file: {exc}")], str(path)) from None
    if not text.strip():
        raise SpecError([("", f"{what} file is empty")], str(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError([("", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")],
                        str(path)) from None


def _location(err: dict[str, Any]) -> tuple[str, str]:
    path = ""
    for part in err["loc"]:
        path = join_path(path, f"[{part}]" if isinstance(part, int) else str(part))
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required key is missing"
    return path, message.removeprefix("Value error, ")
