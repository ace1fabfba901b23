"""Nevergrad optimisers as steering methods: ``nevergrad:<Name>`` for any name in ``ng.optimizers.registry``.

Steering is stateless (DESIGN.md §3.3), so every call builds a fresh optimiser, replays the history into it
with "tell not asked" and asks for new points:

* Done points are told with their loss; failed and pending points with the worst loss seen so far (a
  pessimistic constant liar), which steers the optimiser away from crashing regions and from points already
  being evaluated without distorting the loss scale the way a huge penalty would. Before any point is done
  there is nothing to compare with, so they are not told. None of them is ever proposed again:
  ``Problem.claim`` refuses every known point, and an asked candidate that duplicates one is told its known
  loss (or the liar) before asking again.
* ``num_workers`` is the batch size, except for sequential-only optimisers (``no_parallelization``: Cobyla,
  BFGS, ...), which get one worker and are told the liar for each point they propose, since they wait for a
  loss before proposing the next. ``budget`` is what is replayed plus this batch and one more: the study's
  real budget is unknown to steering, and NGOpt's choice of optimiser follows what it is actually told.
* "Not asked" points inform DE (they replace its worst member: it keeps the best points as its population)
  and the (1+1) family (NGOpt's choice on any space with a categorical: its best point and step size) as
  they are; CMA drops them, so it gets them through candidates it asked for (see ``_replayed``). Replaying
  DE and the (1+1) that way too (DE would then rotate the parent it breeds from and a (1+1) would count its
  asks, as in a stateful run) changed the MLPF quality benchmark by less than its noise and made a call on
  1,000 points 60 to 100 % slower, so they are not.
* Optimisers that refuse replayed points, need a package that is not installed or break on the space end in
  a SpecError on ``method`` that names them.

Bounded ranges. A bounded dimension (an integer one too, each value owning a unit-wide bin) has mutation sigma
range / ``SIGMAS_PER_RANGE`` = range / 2 in nevergrad's standardized units, not nevergrad's own range / 6. The
discrete mutations of the (1+1) family, among them DiscreteLenglerOnePlusOne that NGOpt picks on any space with
an unordered categorical (see below), redraw a coordinate from N(0, 1) in those units: with range / 6 the draw
falls in the middle third of the range 68 % of the time and in the outer tenth at either end about 1 %, so they
could hardly reach the edges where good hyperparameters often are (the MLPF surrogate's best region has dropout
and weight decay at their lower bounds and lr in the top fifth of its log range). With range / 2, bounced back
at the bounds (nevergrad's default), the draw is uniform over the range to within 3 %: the prior random search
and TPE sample from. On the MLPF surrogate (steering_quality benchmark, 10 seeds, median best loss at 50
evaluations) NGOpt went from 445.2 to 439.2 against random's 441.7, and a plain stateful NGOpt loop from 443.0
to 437.4: the old failure was NGOpt's, not only the replay's. CMA (its own step size adapts) and DE (scale-free
differences; it starts from ``full_range_sampling``) moved by less than their noise on the three problems;
the Gaussian OnePlusOne takes larger first steps and did better on Branin (3.07 to 1.28) and as well elsewhere.
A (1+1) rebuilt each call has asked nothing, so Lengler's mutation rate, which falls with the number of asks,
is always its last (one coordinate); setting its ask count to the study's size changed the MLPF median by
less than 0.1 either way, so it is not done. Presenting numeric categoricals as ordered would not change
NGOpt's choice (a ``TransitionChoice`` also gets DiscreteLenglerOnePlusOne) and would drop the user's "unordered".

Speed. Profiling (cProfile) of the obvious replay, ``spawn_child(new_value=...)`` then ``tell`` per point,
showed 7 to 100 ms per point on the MLPF space (NGOpt, which picked a CMA portfolio, 70 to 100 ms), nearly all
of it in nevergrad walking its parameter trees: every copy, freeze, constraint check and conversion visits
each node, each Scalar is three nodes (itself, its ``parameters`` dict, its ``sigma``) and a ``Choice`` of k
categories is k + 5. Hence:

* dimensions of one kind share one nevergrad ``Array`` (per-element bounds and sigma, log kinds in log
  space, bounded ones sampled uniformly between their bounds, exactly as ``ng.p.Scalar`` and ``ng.p.Log``
  with both bounds do; one integer-cast array for ``uniformint``), and an unordered
  categorical is the weight array inside ``ng.p.Choice`` (``Choice(...).indices``: the same softmax layer
  and arity that nevergrad analyses, without a node per category); the MLPF space drops from 43 nodes to 13;
* history values are converted to standardized data in one vectorised nevergrad call per group, and each
  candidate is ``spawn_child().set_standardized_data(row)``;
* wrappers that only delegate (NGOpt and the other competence maps, CMA) are bypassed: their selected
  optimiser is told directly, which halves the work;
* ``Choice`` is deterministic (argmax of its weights): a replayed point means exactly its category, and on
  MLPF NGOpt picks DiscreteLenglerOnePlusOne, whatever the budget and batch, instead of DiscreteBSOOnePlusOne
  (one worker; its mutation rate follows the study's budget, which steering does not know) or the CMandAS2
  portfolio (two or more) that it picks when choices are drawn at random (it then deems the function noisy).

Even so nevergrad costs 1.5 to 2 ms per told point (4 to 5 ms for CMA, whose every tell rebuilds a
``p.helpers.Normalizer``), so at most ``REPLAY_LIMIT`` completed points are told: the ``REPLAY_ELITES`` best plus
the most recent, in history order. That is what these optimisers keep anyway (a (1+1) its best point, DE and
PSO a population of the best, CMA the last few generations); all older points still count for deduplication.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import heapq
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import nevergrad as ng
import numpy as np
from nevergrad.optimization.optimizerlib import _CMA

from hepopt.errors import SpecError
from hepopt.space import Dimension, SearchSpace
from steering_container.api import Problem, derive_seed

#: Completed points told to the optimiser at most: with LIAR_LIMIT, keeps CMA (the slowest to tell, about 4 ms
#: a point) under 1 s on MLPF on a busy 2-core machine; NGOpt takes about half of that.
REPLAY_LIMIT = 80
#: How many of those are the best points; the rest are the most recent ones.
REPLAY_ELITES = 30
#: Failed and pending points told at most (the most recent ones).
LIAR_LIMIT = 30
#: Asks per requested point before giving up; ``propose`` tops up the rest at random.
ASKS_PER_POINT = 10
#: Seconds one ask may take before the optimiser is deemed stuck (see ``_ask_within_deadline``).
ASK_TIMEOUT_S = 20.0
#: Loss told when none is known yet: any constant will do, only comparisons between losses matter.
NEUTRAL_LOSS = 0.0
#: Close matches named when an optimiser name is unknown.
MAX_SUGGESTIONS = 5
#: Optimisers suggested when nothing resembles an unknown name.
EXAMPLE_OPTIMIZERS = ("NGOpt", "CMA", "TwoPointsDE", "DiscreteOnePlusOne", "OnePlusOne", "PSO", "RandomSearch")
#: Width of a bounded dimension in units of mutation sigma. With 2 (and nevergrad's default "bouncing" bounds) a
#: standardized coordinate drawn from N(0, 1) lands uniformly in the range (every tenth of it within 3 % of 10 %
#: of the draws), as random search and TPE's prior sample; nevergrad's own default for bounded scalars, 6, puts
#: 68 % of the draws in the middle third and about 1 % in each outer tenth (see "Bounded ranges" above).
SIGMAS_PER_RANGE = 2.0

_BOUNDED_KINDS = frozenset({"uniform", "quniform", "loguniform", "qloguniform"})
_FREE_KINDS = frozenset({"normal", "qnormal", "lognormal", "qlognormal"})


def check_optimizer_name(name: str) -> None:
    """Raise SpecError unless ``name`` is a nevergrad optimiser, naming the closest ones."""
    if name in ng.optimizers.registry:
        return
    known = sorted(ng.optimizers.registry)
    by_lower = {k.lower(): k for k in known}
    close = [by_lower[k] for k in difflib.get_close_matches(name.lower(), by_lower, n=MAX_SUGGESTIONS)]
    hint = f"did you mean {', '.join(close)}?" if close else f"for example {', '.join(EXAMPLE_OPTIMIZERS)}"
    raise SpecError([("method", f"unknown nevergrad optimizer {name!r}; {hint} "
                      f"({len(known)} are known, see nevergrad.optimizers.registry)")])


def nevergrad_method(optimizer_name: str) -> Callable[[Problem, int], list[dict[str, Any]]]:
    """The steering method running nevergrad's ``optimizer_name``; SpecError when there is none."""
    check_optimizer_name(optimizer_name)
    return functools.partial(propose_nevergrad, optimizer_name)


def propose_nevergrad(optimizer_name: str, problem: Problem, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` new points, claimed, from a fresh optimiser that has been told the history."""
    encoding = Encoding(problem.space)
    if not encoding.groups or n <= 0:
        return []  # nothing to optimise: propose() fills in the only points there are
    with warnings.catch_warnings(), _as_spec_errors(optimizer_name):
        warnings.simplefilter("ignore", ng.errors.NevergradWarning)
        warnings.filterwarnings("ignore", module="cma")  # pycma's "no matplotlib" notice
        return _run(optimizer_name, encoding, problem, n)


@contextlib.contextmanager
def _as_spec_errors(optimizer_name: str) -> Iterator[None]:
    """Turn an optimiser that cannot run here into a SpecError on ``method`` (iDDS then gets a clear message)."""
    advice = "use e.g. NGOpt, CMA or TwoPointsDE"
    try:
        yield
    except SpecError:
        raise
    except ng.errors.TellNotAskedNotSupportedError as exc:
        raise SpecError([("method", f"nevergrad optimizer {optimizer_name!r} cannot learn from points it did not "
                          f"propose, which stateless steering needs; {advice}")]) from exc
    except ImportError as exc:
        raise SpecError([("method", f"nevergrad optimizer {optimizer_name!r} needs a package that is not "
                          f"installed ({exc}); {advice}")]) from exc
    except (ArithmeticError, AssertionError, LookupError, RuntimeError, TypeError, ValueError) as exc:
        raise SpecError([("method", f"nevergrad optimizer {optimizer_name!r} failed on this search space "
                          f"({type(exc).__name__}: {exc}); {advice}")]) from exc


def _run(optimizer_name: str, encoding: Encoding, problem: Problem, n: int) -> list[dict[str, Any]]:
    replay = replay_plan(problem)
    parametrization = encoding.parametrization(derive_seed(problem.seed, "nevergrad", optimizer_name))
    optimizer, learner, sequential = _make_optimizer(optimizer_name, parametrization, len(replay) + 2 * n, n)
    rows = encoding.standardize([flat for flat, _ in replay])
    for row, (_, loss) in zip(rows, replay, strict=True):
        learner.tell(_replayed(learner, parametrization, row), loss)
    return _ask_new(optimizer, encoding, problem, n, sequential)


def _replayed(learner: Any, parametrization: ng.p.Parameter, row: np.ndarray) -> ng.p.Parameter:
    """A candidate carrying one history point, in the form ``learner`` learns from.

    nevergrad's CMA silently drops points it did not ask for (its pycma ``tell`` error is swallowed), so
    the stateless replay would never move its distribution. It gets one of its own asked candidates whose
    data, as CMA reads it back at tell time (its per-candidate data cache), is the history point: pycma
    then learns from the history as from injected external solutions. Asked candidates are frozen, so
    the cache is the one place the point can go.
    """
    if isinstance(learner, _CMA):
        candidate = learner.ask()
        candidate._meta[_CMA._CACHE_KEY] = row
        return candidate
    return parametrization.spawn_child().set_standardized_data(row)


def _make_optimizer(name: str, parametrization: ng.p.Parameter, budget: int, n: int) -> tuple[Any, Any, bool]:
    """The optimiser, the one to tell (see ``_delegate``), and whether it is sequential-only."""
    factory = ng.optimizers.registry[name]
    if not getattr(factory, "no_parallelization", False):
        try:
            optimizer = factory(parametrization, budget=budget, num_workers=n)
            return optimizer, _delegate(optimizer), False
        except ValueError:  # a part of it is sequential-only, and nevergrad only says so when building it
            pass
    optimizer = factory(parametrization, budget=budget, num_workers=1)
    return optimizer, _delegate(optimizer), True


def _delegate(optimizer: Any) -> Any:
    """The optimiser a wrapper passes every tell to (NGOpt's choice, CMA's pycma), else itself.

    Telling it directly skips the wrapper's own bookkeeping, which duplicates the inner one and is never read:
    the wrapper's asks come from the inner optimiser.
    """
    for wrapper in (ng.optimizers.NGOptBase, ng.optimizers.ChoiceBase):
        if isinstance(optimizer, wrapper):
            return optimizer.optim
    return optimizer


def replay_plan(problem: Problem) -> list[tuple[dict[str, Any], float]]:
    """The (point, loss) pairs to tell: completed points in history order, then failed and pending ones."""
    completed = problem.completed
    if not completed:
        return []
    if len(completed) > REPLAY_LIMIT:
        elites = heapq.nsmallest(REPLAY_ELITES, range(len(completed)), key=lambda i: completed[i][1])
        recent = range(len(completed) - (REPLAY_LIMIT - REPLAY_ELITES), len(completed))
        completed = [completed[i] for i in sorted(set(elites).union(recent))]
    liar = max(loss for _, loss in problem.completed)
    others = (problem.failed + problem.pending)[-LIAR_LIMIT:]
    return completed + [(flat, liar) for flat in others]


def _ask_new(optimizer: Any, encoding: Encoding, problem: Problem, n: int, sequential: bool) -> list[dict[str, Any]]:
    """Ask until ``n`` new points; a sequential optimiser is told the liar for each, as it waits for a loss."""
    liar = max((loss for _, loss in problem.completed), default=NEUTRAL_LOSS)
    known: dict[tuple[Any, ...], float] = {}  # loss by point key, filled at the first duplicate
    out: list[dict[str, Any]] = []
    for _ in range(ASKS_PER_POINT * n):
        candidate = _ask_within_deadline(optimizer)
        flat = encoding.decode(candidate.value)
        if problem.claim(flat):
            out.append(flat)
            if sequential:
                optimizer.tell(candidate, liar)
            if len(out) == n:
                break
        else:
            if not known:
                known.update((problem.space.key(done), loss) for done, loss in problem.completed)
            optimizer.tell(candidate, known.get(problem.space.key(flat), liar))  # so that it moves on
    return out


class OptimizerStalledError(RuntimeError):
    """An ask did not return in ``ASK_TIMEOUT_S``."""


def _ask_within_deadline(optimizer: Any) -> ng.p.Parameter:
    """``optimizer.ask()``, or OptimizerStalledError when it blocks.

    Some optimisers run scipy in a thread that waits for the loss of each point it proposed; inside a chain
    or portfolio a replayed history can leave one waiting for a loss that is never routed to it, and its next
    ask would block forever. The ask runs in a daemon thread so that steering fails instead of hanging (the
    blocked thread is abandoned).
    """
    outcome: list[Any] = []

    def ask() -> None:
        try:
            outcome.append(optimizer.ask())
        except Exception as exc:  # handed over to the calling thread below
            outcome.append(exc)

    worker = threading.Thread(target=ask, name="nevergrad-ask", daemon=True)
    worker.start()
    worker.join(ASK_TIMEOUT_S)
    if not outcome:
        raise OptimizerStalledError(f"an ask took more than {ASK_TIMEOUT_S:g} s; the optimiser waits for a result "
                                    "that stateless steering cannot give it")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


class Encoding:
    """How the points of a SearchSpace map onto a nevergrad parametrization and back.

    The parametrization is an ``ng.p.Dict`` of groups (see the module docstring); fixed dimensions and
    one-category categoricals are constants, added back to every decoded point.
    """

    def __init__(self, space: SearchSpace):
        self.space = space
        self.constants = {d.name: _constant(d) for d in space.dimensions if _is_constant(d)}
        variables = [d for d in space.dimensions if not _is_constant(d)]
        self.groups = _make_groups(variables)

    def parametrization(self, seed: int) -> ng.p.Dict:
        parametrization = ng.p.Dict(**{g.key: g.parameter() for g in self.groups})
        parametrization.random_state = np.random.RandomState(seed)
        return parametrization

    def standardize(self, flats: Sequence[dict[str, Any]]) -> np.ndarray:
        """Standardized data of ``flats`` (one row each), in the Dict's layout (groups sorted by key)."""
        if not flats:
            return np.zeros((0, 0))
        return np.concatenate([g.standardize(flats) for g in self.groups], axis=1)

    def decode(self, value: dict[str, Any]) -> dict[str, Any]:
        """The flat point of a candidate's value, quantized onto the values each dimension can take."""
        flat = dict(self.constants)
        for group in self.groups:
            flat.update(zip((d.name for d in group.dims), group.decode(value[group.key]), strict=True))
        return {name: flat[name] for name in self.space.names}


def _is_constant(dim: Dimension) -> bool:
    return dim.kind == "fixed" or (dim.kind == "categorical" and len(dim.choices) == 1)


def _constant(dim: Dimension) -> Any:
    return dim.value if dim.kind == "fixed" else dim.choices[0]


class _NumericGroup:
    """Numeric dimensions of one sort ("bounded", "free" or "integer") sharing one ``ng.p.Array``.

    Values live in log space for log kinds, as in ``ng.p.Log``; bounded dimensions mutate with sigma = range /
    SIGMAS_PER_RANGE around the middle (see the module docstring), free ones with the dimension's own ``mu``
    and ``sigma``.
    """

    def __init__(self, key: str, dims: Sequence[Dimension], sort: str):
        self.key, self.dims, self.sort = key, tuple(dims), sort
        self.log = np.array([d.is_log for d in dims])
        if sort == "free":
            self.lower = self.upper = None
            self.init = np.array([d.mu for d in dims], dtype=float)
            self.sigma = np.array([d.sigma for d in dims], dtype=float)
            return
        half = 0.5 if sort == "integer" else 0.0  # each integer owns a unit-wide bin
        self.lower = self._to_native(np.array([[d.low - half for d in dims]], dtype=float))[0]
        self.upper = self._to_native(np.array([[d.high + half for d in dims]], dtype=float))[0]
        self.init = (self.lower + self.upper) / 2
        self.sigma = (self.upper - self.lower) / SIGMAS_PER_RANGE

    def parameter(self, rows: int = 1) -> ng.p.Array:
        """The group's parameter, or for ``rows`` > 1 one holding that many copies side by side.

        Bounded groups sample uniformly between their bounds (log-uniformly for log kinds), as ``ng.p.Scalar``
        and ``ng.p.Log`` with both bounds do: ``ng.p.Array(init=..., lower=..., upper=...)`` would instead sample
        around ``init`` with the mutation sigma, and optimisers that start from samples (DE's first population)
        would then hardly ever look near the bounds.
        """
        tile = functools.partial(np.tile, reps=rows)
        param = ng.p.Array(init=tile(self.init), mutable_sigma=False).set_mutation(sigma=tile(self.sigma))
        if self.lower is not None:
            param.set_bounds(tile(self.lower), tile(self.upper), full_range_sampling=True)
        return param.set_integer_casting() if self.sort == "integer" else param

    def standardize(self, flats: Sequence[dict[str, Any]]) -> np.ndarray:
        native = self._to_native(np.array([[f[d.name] for d in self.dims] for f in flats], dtype=float))
        return _standardize(self.parameter(len(flats)), lambda p: setattr(p, "value", native.ravel()),
                            len(flats))

    def decode(self, value: Any) -> list[Any]:
        native = np.asarray(value, dtype=float).reshape(1, -1)
        raw = native.copy()
        raw[:, self.log] = np.exp(native[:, self.log])
        return [d.quantize(float(x)) for d, x in zip(self.dims, raw[0], strict=True)]

    def _to_native(self, values: np.ndarray) -> np.ndarray:
        out = values.copy()
        # a qlognormal value rounded down to 0 has no logarithm: take the smallest positive float instead
        out[:, self.log] = np.log(np.maximum(values[:, self.log], np.finfo(float).tiny))
        return out


class _CategoricalGroup:
    """Categorical dimensions with the same number of categories, as one nevergrad choice of repetitions.

    Unordered ones use the weight array of ``ng.p.Choice`` (deterministic); ordered ones a whole
    ``ng.p.TransitionChoice``, whose arity some discrete optimisers read.
    """

    def __init__(self, key: str, dims: Sequence[Dimension], ordered: bool):
        self.key, self.dims, self.ordered = key, tuple(dims), ordered
        self.arity = len(dims[0].choices)

    def parameter(self, rows: int = 1) -> ng.p.Parameter:
        repetitions = rows * len(self.dims)
        if self.ordered:
            return ng.p.TransitionChoice(self.arity, repetitions=repetitions)
        return ng.p.Choice(self.arity, repetitions=repetitions, deterministic=True).indices

    def standardize(self, flats: Sequence[dict[str, Any]]) -> np.ndarray:
        indices = np.array([[_index(d, f[d.name]) for d in self.dims] for f in flats], dtype=int).ravel()

        def set_indices(param: ng.p.Parameter) -> None:
            (param.indices if self.ordered else param).value = indices

        return _standardize(self.parameter(len(flats)), set_indices, len(flats))

    def decode(self, value: Any) -> list[Any]:
        return [d.choices[int(i)] for d, i in zip(self.dims, np.ravel(value), strict=True)]


def _index(dim: Dimension, value: Any) -> int:
    key = dim.canonical(value)
    return next(i for i, c in enumerate(dim.choices) if dim.canonical(c) == key)


def _standardize(reference: ng.p.Parameter, set_value: Callable[[ng.p.Parameter], None], rows: int) -> np.ndarray:
    """Let nevergrad convert ``rows`` points at once: set them on a copy of a ``rows``-wide parameter."""
    reference.random_state = np.random.RandomState(0)  # unused, but spares numpy's global generator
    child = reference.spawn_child()
    set_value(child)
    return child.get_standardized_data(reference=reference).reshape(rows, -1)


def _make_groups(dims: Sequence[Dimension]) -> list[_NumericGroup | _CategoricalGroup]:
    """Group dimensions by how nevergrad represents them; keys sort in the order of the list."""
    buckets: dict[tuple[Any, ...], list[Dimension]] = {}
    for dim in dims:
        buckets.setdefault(_sort_of(dim), []).append(dim)
    groups: list[_NumericGroup | _CategoricalGroup] = []
    for i, (sort, members) in enumerate(buckets.items()):
        key = f"g{i:04d}"
        if sort[0] == "categorical":
            groups.append(_CategoricalGroup(key, members, ordered=sort[2]))
        else:
            groups.append(_NumericGroup(key, members, sort[0]))
    return groups


def _sort_of(dim: Dimension) -> tuple[Any, ...]:
    if dim.kind == "categorical":
        return ("categorical", len(dim.choices), dim.ordered)
    if dim.kind == "uniformint":
        return ("integer",)
    if dim.kind in _BOUNDED_KINDS:
        return ("bounded",)
    if dim.kind in _FREE_KINDS:
        return ("free",)
    raise ValueError(f"no nevergrad mapping for kind {dim.kind!r}")
