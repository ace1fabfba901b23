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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from hepopt.errors import SpecError, join_path
from hepopt.space import SearchSpace

#: Upper limit on ``maxPoints`` and ``maxEvaluationJobs``: larger values are typos, not studies.
MAX_POINTS_LIMIT = 1_000_000
#: Method names the core accepts; the steering container checks nevergrad optimizer names.
METHOD_PATTERN = re.compile(r"^(random|grid|tpe|anneal|nevergrad:[A-Za-z0-9_]+)$")
#: Early-stopping policies the orchestrator knows (docs/EARLY_STOPPING.md describes each).
STOPPING_POLICIES = ("none", "median", "asha", "hyperband", "predictive")
#: Learning-curve predictors the predictive policy may use (steering_container.prediction has them).
STOPPING_PREDICTORS = ("svr", "qsvr", "qsvr-ensemble")
#: Defaults of the policy-specific keys. Those keys default to None so that a dumped task carries only
#: what the user wrote, and a key given to a policy that ignores it can be refused.
DEFAULT_GRACE_PERIOD = 1
DEFAULT_REDUCTION_FACTOR = 3
DEFAULT_QUANTILE = 0.25
DEFAULT_PREDICTOR = "svr"
DEFAULT_MIN_COMPLETED = 5
DEFAULT_REFIT_EVERY = 5
DEFAULT_MIN_TRIALS = 5
#: The predictors need this many fully trained curves to fit anything.
MIN_COMPLETED_FLOOR = 5
#: Larger reduction factors keep (almost) nobody: a typo, not a schedule.
MAX_REDUCTION_FACTOR = 100
_RUNG_KEYS = frozenset({"gracePeriod", "reductionFactor", "maxResource"})
#: The keys each policy reads; any other policy key given for it is refused (it would be ignored).
POLICY_KEYS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "median": frozenset({"minTrials", "warmupSteps"}),
    "asha": _RUNG_KEYS,
    "hyperband": _RUNG_KEYS | {"brackets"},
    "predictive": _RUNG_KEYS | {"brackets", "quantile", "predictor", "minCompleted", "refitEvery"},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EarlyStopping(_Strict):
    """Which policy decides, from intermediate values, that a point should stop early.

    ``step`` in a report is the 0-based index of the epoch just finished, so after step ``s`` a point has
    used ``s + 1`` units of resource; rungs sit at resources ``gracePeriod * reductionFactor**k`` below
    ``maxResource``. Policy-specific keys left out take the ``DEFAULT_*`` values (see the properties).
    """

    policy: Literal[STOPPING_POLICIES] = "none"  # type: ignore[valid-type]
    minTrials: int = Field(DEFAULT_MIN_TRIALS, ge=1, description="median: points at the step needed to act")
    warmupSteps: int = Field(0, ge=0, description="median: intermediate steps always allowed")
    gracePeriod: int | None = Field(None, ge=1, description="resource (epochs) of the first rung")
    reductionFactor: int | None = Field(None, ge=2, le=MAX_REDUCTION_FACTOR,
                                        description="1/reductionFactor of the points at a rung continue")
    maxResource: int | None = Field(None, ge=2, description="resource a point trains for when never stopped")
    brackets: int | None = Field(None, ge=1, description="hyperband, predictive: brackets used (default: all "
                                 "that fit below maxResource)")
    quantile: float | None = Field(None, gt=0, lt=1, description="predictive: continue when the predicted "
                                   "final value beats this quantile of the completed points' final values")
    predictor: Literal[STOPPING_PREDICTORS] | None = None  # type: ignore[valid-type]
    minCompleted: int | None = Field(None, ge=MIN_COMPLETED_FLOOR,
                                     description="predictive: completed points before the predictor decides")
    refitEvery: int | None = Field(None, ge=1, description="predictive: newly completed points per refit")

    @field_validator("minTrials", "warmupSteps")
    @classmethod
    def _median_key(cls, value: int, info: ValidationInfo) -> int:
        # Older tasks were stored with these two at their defaults whatever the policy; those stay valid.
        if value != cls.model_fields[str(info.field_name)].default:
            _check_read(info)
        return value

    @field_validator("gracePeriod", "reductionFactor", "maxResource", "brackets", "quantile", "predictor",
                     "minCompleted", "refitEvery")
    @classmethod
    def _policy_key(cls, value: Any, info: ValidationInfo) -> Any:
        _check_read(info)
        return value

    @model_validator(mode="after")
    def _rungs_fit(self) -> EarlyStopping:
        if self.policy == "hyperband" and self.maxResource is None:
            raise ValueError("maxResource: the hyperband policy needs it (the resource of a full training)")
        if self.maxResource is not None and self.grace_period >= self.maxResource:
            raise ValueError(f"gracePeriod ({self.grace_period}) must be below maxResource ({self.maxResource}): "
                             "otherwise no rung exists and nothing is ever stopped")
        if self.brackets is not None and self.brackets > self.bracket_limit:
            raise ValueError(f"brackets: at most {self.bracket_limit} fit between gracePeriod {self.grace_period} "
                             f"and maxResource {self.maxResource} with reductionFactor {self.reduction_factor}")
        return self

    @property
    def grace_period(self) -> int:
        return DEFAULT_GRACE_PERIOD if self.gracePeriod is None else self.gracePeriod

    @property
    def reduction_factor(self) -> int:
        return DEFAULT_REDUCTION_FACTOR if self.reductionFactor is None else self.reductionFactor

    @property
    def bracket_limit(self) -> int:
        if self.maxResource is None:
            return 1
        return hyperband_bracket_limit(self.grace_period, self.reduction_factor, self.maxResource)

    @property
    def bracket_count(self) -> int:
        return self.bracket_limit if self.brackets is None else self.brackets

    @property
    def prune_quantile(self) -> float:
        return DEFAULT_QUANTILE if self.quantile is None else self.quantile

    @property
    def predictor_name(self) -> str:
        return DEFAULT_PREDICTOR if self.predictor is None else self.predictor

    @property
    def min_completed(self) -> int:
        return DEFAULT_MIN_COMPLETED if self.minCompleted is None else self.minCompleted

    @property
    def refit_every(self) -> int:
        return DEFAULT_REFIT_EVERY if self.refitEvery is None else self.refitEvery


def hyperband_bracket_limit(grace_period: int, reduction_factor: int, max_resource: int) -> int:
    """Hyperband's s_max + 1: the brackets whose first rung, grace_period * reduction_factor**b, fits."""
    count, first_rung = 0, grace_period
    while first_rung <= max_resource:
        count, first_rung = count + 1, first_rung * reduction_factor
    return count


def _check_read(info: ValidationInfo) -> None:
    """Refuse a key the chosen policy ignores: a silently ignored setting is a typo waiting to bite."""
    policy = info.data.get("policy")
    if policy in POLICY_KEYS and info.field_name not in POLICY_KEYS[policy]:
        readers = [name for name, keys in POLICY_KEYS.items() if info.field_name in keys]
        raise ValueError(f"the {policy!r} policy does not use this key; it is read by {', '.join(readers)}")


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
        raise SpecError(validation_problems(exc), source) from None
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


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """pydantic's errors as SpecError problems: (key path, plain message), as the house style reports them."""
    return [_location(err) for err in exc.errors()]


def _location(err: Any) -> tuple[str, str]:
    path = ""
    for part in err["loc"]:
        path = join_path(path, f"[{part}]" if isinstance(part, int) else str(part))
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required key is missing"
    return path, message.removeprefix("Value error, ")
