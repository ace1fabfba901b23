"""TPE and simulated annealing from hyperopt, rebuilt from the history on every call.

Steering is stateless (DESIGN.md §3.3), so each call turns the history into hyperopt observations:
completed points carry their loss, failed points count as infinitely bad (as hyperopt treats a trial
without a loss), and pending points plus every point proposed earlier in the same call are "constant
liars" with the worst observed loss. A liar ranks with the worst evaluations, so it never enters
TPE's good group nor becomes an annealing centre, and the sampler moves away from work already handed
out. The worst loss rather than ``inf`` keeps liars distinguishable from real failures; since both
algorithms only use the rank of a loss, the two choices propose the same points except on ties.

Speed (profiled on a 10,000-point history): inserting validated ``Trials`` documents one by one costs
O(N²), ``fmin``/``suggest`` rescan every document for each proposal, and two hyperopt functions loop in
Python over every observation (the likelihood of quantised values, and TPE's split into good and bad
observations). Here both algorithms read plain columns built once per call and grown by one liar per
proposal, with no trial documents; TPE's posterior graph and annealing's sampler are built once per
call; and the two slow functions are swapped, in this call's own graph, for vectorised equivalents
that return the same values (registered in hyperopt's pyll scope under their own ``hepopt_`` names;
hyperopt's functions stay untouched for other users in the process).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from hyperopt import anneal, hp, pyll, tpe
from hyperopt.algobase import SuggestAlgo
from hyperopt.base import Domain
from hyperopt.pyll import scope
from scipy.special import erf

from hepopt.errors import SpecError
from hepopt.space import Dimension, SearchSpace
from steering_container.api import Problem, derive_seed
from steering_container.methods import Method

#: The hyperopt algorithms offered: Tree-structured Parzen Estimator and simulated annealing.
ALGORITHMS = ("tpe", "anneal")
#: Real observations TPE needs before it models the loss; before that it samples the prior.
#: hyperopt's default, but counted on completed points only: pending and failed ones say nothing
#: about where the good region is.
TPE_STARTUP_POINTS = 20
#: Observations at most in TPE's good group, and the recent ones its linear forgetting keeps at
#: full weight (hyperopt's DEFAULT_LF).
TPE_GOOD_CAP = tpe.DEFAULT_LF
#: Candidates drawn from TPE's good-region density per proposal (hyperopt's default).
TPE_EI_CANDIDATES = 24
#: TPE's fraction (times sqrt(N)) of observations forming the good group (hyperopt's default).
TPE_GAMMA = 0.25
#: Weight of the prior among TPE's Parzen components (hyperopt's default).
TPE_PRIOR_WEIGHT = 1.0
#: Fresh seeds tried for one proposal that keeps landing on known points. Nothing else changes
#: between tries, so once they are used up the next proposals would fare no better: the call
#: stops and ``propose()`` tops up at random.
MAX_TRIES_PER_POINT = 4
#: Distance between the trial ids tpe.suggest gives its candidates and the last real id.
TPE_FAKE_ID_GAP = 2
#: Mean rank (0 = best) of the trial an annealing proposal is centred on (hyperopt's default).
ANNEAL_AVG_BEST_IDX = 2.0
#: How fast annealing's neighbourhood shrinks with the number of observations (hyperopt's default).
ANNEAL_SHRINK_COEF = 0.1
#: Grid step of integer-valued dimensions (uniformint, ordered categories as indices).
INTEGER_STEP = 1
#: Smallest value a log-scaled observation is given to hyperopt (a qlognormal value may round to 0).
MIN_LOG_VALUE = np.finfo(float).tiny
#: hyperopt's floor on Gaussian widths in its likelihoods (tpe.EPS), reused so results match it.
SIGMA_FLOOR = tpe.EPS


def hyperopt_method(name: str) -> Method:
    """The proposer for ``tpe`` or ``anneal``."""
    if name not in ALGORITHMS:
        raise SpecError([("method", f"unknown hyperopt method {name!r}; known: {list(ALGORITHMS)}")])
    return partial(_propose, name)


def _propose(name: str, problem: Problem, n: int) -> list[dict[str, Any]]:
    codec = _Codec(problem.space)
    if not codec.labels:
        return _fixed_point(problem, codec, n)
    history = _History.from_problem(problem, codec)
    sampler = _Sampler(name, codec, history)
    out: list[dict[str, Any]] = []
    for slot in range(n):
        flat = _new_point(problem, codec, sampler, slot, name)
        if flat is None:
            break
        out.append(flat)
        history.add(codec.encode(flat), history.liar_loss)
    return out


def _new_point(problem: Problem, codec: _Codec, sampler: _Sampler, slot: int, name: str) -> dict[str, Any] | None:
    """One claimed new point, or None when every try lands on a known point."""
    for attempt in range(MAX_TRIES_PER_POINT):
        flat = codec.decode(sampler.suggest(derive_seed(problem.seed, name, slot, attempt)))
        if problem.claim(flat):
            return flat
    return None


def _fixed_point(problem: Problem, codec: _Codec, n: int) -> list[dict[str, Any]]:
    """A space of fixed dimensions has exactly one point."""
    flat = codec.decode({})
    return [flat] if n > 0 and problem.claim(flat) else []


# --- search space <-> hyperopt ------------------------------------------------------------------


class _Codec:
    """Translates between flat points and hyperopt labels/values; fixed dimensions have no label."""

    def __init__(self, space: SearchSpace):
        self.dimensions = space.dimensions
        self.searched = [d for d in space.dimensions if d.kind != "fixed"]
        self.labels = [d.name for d in self.searched]
        self._indexers = {d.name: _choice_indexer(d) for d in self.searched if d.kind == "categorical"}

    def expression(self) -> dict[str, Any]:
        return {d.name: _hp_expression(d) for d in self.searched}

    def encode(self, flat: dict[str, Any]) -> dict[str, float]:
        """hyperopt's value of each label: a category index, or the number (floored on log scales)."""
        out = {}
        for dim in self.searched:
            value = flat[dim.name]
            if dim.kind == "categorical":
                out[dim.name] = self._indexers[dim.name](value)
            elif dim.is_log:
                out[dim.name] = max(float(value), MIN_LOG_VALUE)
            else:
                out[dim.name] = float(value)
        return out

    def decode(self, values: dict[str, Any]) -> dict[str, Any]:
        """A flat point from hyperopt's values, snapped onto what each dimension can take."""
        flat = {}
        for dim in self.dimensions:
            if dim.kind == "fixed":
                flat[dim.name] = dim.value
            elif dim.kind == "categorical":
                index = min(max(round(float(values[dim.name])), 0), len(dim.choices) - 1)
                flat[dim.name] = dim.choices[index]
            else:
                flat[dim.name] = dim.quantize(float(values[dim.name]))
        return flat


def _hp_expression(dim: Dimension) -> Any:
    """hyperopt's prior for one dimension, on the same scale and grid as Dimension.sample."""
    label, kind = dim.name, dim.kind
    if kind == "categorical":
        if dim.ordered:
            # An index on a line lets TPE's Parzen estimator exploit that neighbours are alike.
            return _integer_range(label, 0, len(dim.choices) - 1)
        return hp.choice(label, list(range(len(dim.choices))))
    if kind == "uniformint":
        return _integer_range(label, dim.low, dim.high)
    if kind == "uniform":
        return hp.uniform(label, dim.low, dim.high)
    if kind == "quniform":
        return hp.quniform(label, dim.low, dim.high, dim.q)
    if kind == "loguniform":
        return hp.loguniform(label, math.log(dim.low), math.log(dim.high))
    if kind == "qloguniform":
        return hp.qloguniform(label, math.log(dim.low), math.log(dim.high), dim.q)
    if kind == "normal":
        return hp.normal(label, dim.mu, dim.sigma)
    if kind == "qnormal":
        return hp.qnormal(label, dim.mu, dim.sigma, dim.q)
    if kind == "lognormal":
        return hp.lognormal(label, dim.mu, dim.sigma)
    if kind == "qlognormal":
        return hp.qlognormal(label, dim.mu, dim.sigma, dim.q)
    raise SpecError([(label, f"dimension kind {kind!r} has no hyperopt equivalent")])


def _integer_range(label: str, low: int, high: int) -> Any:
    """Integers low..high, each with the same prior mass: the range reaches half a step past each end."""
    half = INTEGER_STEP / 2
    return hp.quniform(label, low - half, high + half, INTEGER_STEP)


def _choice_indexer(dim: Dimension) -> Callable[[Any], int]:
    """value -> category index, telling bools from ints as the space's validation does."""
    choices = dim.choices
    if all(isinstance(c, Hashable) for c in choices):
        table = {(isinstance(c, bool), c): i for i, c in enumerate(choices)}
        return lambda value: table[(isinstance(value, bool), value)]
    return lambda value: next(i for i, c in enumerate(choices)
                              if c == value and isinstance(c, bool) == isinstance(value, bool))


# --- the history as hyperopt observations -------------------------------------------------------


@dataclass
class _History:
    """Observations in hyperopt's columnar form; trial ids follow insertion order.

    Order matters to TPE's linear forgetting (older observations weigh less): completed points keep
    their history order, then failed, then pending points, then this call's proposals.
    """

    labels: list[str]
    liar_loss: float
    tids: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    vals: dict[str, list[float]] = field(default_factory=dict)
    n_completed: int = 0

    @classmethod
    def from_problem(cls, problem: Problem, codec: _Codec) -> _History:
        losses = [loss for _, loss in problem.completed]
        history = cls(codec.labels, max(losses, default=0.0), vals={label: [] for label in codec.labels})
        for flat, loss in problem.completed:
            history.add(codec.encode(flat), loss)
        history.n_completed = len(losses)
        for flat in problem.failed:
            history.add(codec.encode(flat), math.inf)
        for flat in problem.pending:
            history.add(codec.encode(flat), history.liar_loss)
        return history

    def add(self, values: dict[str, float], loss: float) -> None:
        self.tids.append(len(self.tids))
        self.losses.append(loss)
        for label in self.labels:
            self.vals[label].append(values[label])


# --- sampling -----------------------------------------------------------------------------------


class _Sampler:
    """One hyperopt Domain (and, for TPE, one posterior graph) reused for every proposal of a call."""

    def __init__(self, name: str, codec: _Codec, history: _History):
        self.name = name
        self.history = history
        self.domain = Domain(_never_evaluated, codec.expression())
        self._annealer: _ColumnarAnnealing | None = None
        self._posterior = _fast_posterior(self.domain) if name == "tpe" else None

    def suggest(self, seed: int) -> dict[str, Any]:
        """hyperopt's values for one new point."""
        needed = TPE_STARTUP_POINTS if self.name == "tpe" else 1
        if self.history.n_completed < needed:
            return self._from_prior(seed)
        if self.name == "tpe":
            return self._tpe(seed)
        return self._anneal(seed)

    def _from_prior(self, seed: int) -> dict[str, Any]:
        memo = {self.domain.s_new_ids: [len(self.history.tids)], self.domain.s_rng: np.random.default_rng(seed)}
        _, vals = pyll.rec_eval(self.domain.s_idxs_vals, memo=memo)
        return {label: values[0] for label, values in vals.items()}

    def _tpe(self, seed: int) -> dict[str, Any]:
        """What tpe.suggest computes, with observations fed straight into the posterior graph."""
        observed, observed_loss, posterior = self._posterior
        history = self.history
        first_fake_id = len(history.tids) + TPE_FAKE_ID_GAP
        tids = np.asarray(history.tids)  # converted once here, not once per dimension in the graph
        memo = {
            self.domain.s_new_ids: list(range(first_fake_id, first_fake_id + TPE_EI_CANDIDATES)),
            self.domain.s_rng: np.random.default_rng(seed),
            observed_loss["idxs"]: tids,
            observed_loss["vals"]: np.asarray(history.losses),
            observed["idxs"]: dict.fromkeys(history.labels, tids),
            observed["vals"]: {label: np.asarray(values) for label, values in history.vals.items()},
        }
        _, vals = pyll.rec_eval(posterior, memo=memo, print_node_on_error=False)
        return {label: values[0] for label, values in vals.items()}

    def _anneal(self, seed: int) -> dict[str, Any]:
        if self._annealer is None:
            self._annealer = _ColumnarAnnealing(self.domain, self.history)
        return self._annealer.sample(seed)


class _ColumnarAnnealing(anneal.AnnealingAlgo):
    """hyperopt's annealing, reading the columns of a growing _History instead of trial documents.

    AnnealingAlgo's constructor scans every trial document; anneal.suggest builds one per proposal,
    an O(N) Python pass each time. This one is built once per call and sees each liar as it is added.
    """

    def __init__(self, domain: Domain, history: _History):
        SuggestAlgo.__init__(self, domain, None, seed=0)
        self.avg_best_idx = ANNEAL_AVG_BEST_IDX
        self.shrink_coef = ANNEAL_SHRINK_COEF
        self.history = history
        self.node_tids = {label: history.tids for label in history.labels}
        self.node_vals = history.vals
        self.tid_losses_dct = history.losses  # trial ids are list positions, so the list maps id -> loss
        self.best_tids: list[int] = []

    def sample(self, seed: int) -> dict[str, Any]:
        """hyperopt's values for one new point, drawn as anneal.suggest would."""
        self.best_tids = []  # each point picks its own centre, as a fresh AnnealingAlgo would
        self.rng = np.random.default_rng(seed)
        memo = self.eval_nodes(memo={self.domain.s_new_ids: [len(self.history.tids)], self.domain.s_rng: self.rng})
        _, vals = memo[self.expr]
        return {label: values[0] for label, values in vals.items()}


def _never_evaluated(_: Any) -> float:
    raise RuntimeError("steering never evaluates the objective")


# --- vectorised likelihoods ---------------------------------------------------------------------


def _fast_posterior(domain: Domain) -> tuple[Any, Any, Any]:
    """tpe's posterior graph with the quantised likelihoods replaced by vectorised equivalents."""
    observed, observed_loss, posterior = tpe.build_posterior_wrapper(domain, TPE_PRIOR_WEIGHT, TPE_GAMMA)
    for node in pyll.dfs(pyll.as_apply(posterior)):
        if node.name in _VECTORISED:
            node.name = _VECTORISED[node.name].__name__
    return observed, observed_loss, posterior


def hepopt_gmm1_lpdf(samples: Any, weights: Any, mus: Any, sigmas: Any, low: Any = None, high: Any = None,
                     q: Any = None) -> np.ndarray:
    """tpe.GMM1_lpdf, without its Python loop over mixture components for quantised values."""
    if q is None:
        return tpe.GMM1_lpdf(samples, weights, mus, sigmas, low, high, q)
    return _quantised_lpdf(samples, weights, mus, sigmas, low, high, q, log_scale=False)


def hepopt_lgmm1_lpdf(samples: Any, weights: Any, mus: Any, sigmas: Any, low: Any = None, high: Any = None,
                      q: Any = None) -> np.ndarray:
    """tpe.LGMM1_lpdf, without its Python loop over mixture components for quantised values."""
    if q is None:
        return tpe.LGMM1_lpdf(samples, weights, mus, sigmas, low, high, q)
    return _quantised_lpdf(samples, weights, mus, sigmas, low, high, q, log_scale=True)


def _quantised_lpdf(samples: Any, weights: Any, mus: Any, sigmas: Any, low: Any, high: Any, q: float,
                    log_scale: bool) -> np.ndarray:
    """Log mass of each sample's q-bin under a truncated (log-)Gaussian mixture, all components at once.

    ``low``/``high`` bound the mixture on its own scale (log scale for log-normal components), exactly
    as in hyperopt's loops, so the result matches them up to rounding.
    """
    samples = np.asarray(samples, dtype=float)
    weights, mus, sigmas = (np.asarray(a, dtype=float) for a in (weights, mus, sigmas))
    if samples.size == 0:
        return np.asarray([])
    # Quantised candidates repeat (an integer in 0..4 has five values): each distinct one is scored once.
    distinct, position = np.unique(samples.ravel(), return_inverse=True)
    flat = distinct[:, None]
    upper, lower = flat + q / 2, flat - q / 2
    if high is not None:
        upper = np.minimum(upper, math.exp(high) if log_scale else high)
    if low is not None:
        lower = np.maximum(lower, math.exp(low) if log_scale else low)
    if log_scale:
        upper, lower = np.log(np.maximum(upper, SIGMA_FLOOR)), np.log(np.maximum(lower, SIGMA_FLOOR))
    prob = (weights * (_std_cdf(upper, mus, sigmas) - _std_cdf(lower, mus, sigmas))).sum(axis=1)
    p_accept = 1.0
    if low is not None or high is not None:
        p_accept = np.sum(weights * (_std_cdf(high, mus, sigmas) - _std_cdf(low, mus, sigmas)))
    with np.errstate(divide="ignore"):
        return (np.log(prob) - np.log(p_accept))[position].reshape(samples.shape)


def hepopt_split_trials(o_idxs: Any, o_vals: Any, l_idxs: Any, l_vals: Any, gamma: float,
                        gamma_cap: int = TPE_GOOD_CAP) -> tuple[np.ndarray, np.ndarray]:
    """tpe.ap_split_trials with array membership tests instead of a Python loop over observations.

    The ``ceil(gamma * sqrt(N))`` best losses (at most ``gamma_cap``) form the good group; values keep
    their observation order.
    """
    o_idxs, o_vals, l_idxs, l_vals = (np.asarray(a) for a in (o_idxs, o_vals, l_idxs, l_vals))
    n_below = min(math.ceil(gamma * math.sqrt(len(l_vals))), gamma_cap)
    order = np.argsort(l_vals)
    below = np.isin(o_idxs, l_idxs[order[:n_below]])
    above = np.isin(o_idxs, l_idxs[order[n_below:]])
    return o_vals[below], o_vals[above]


def _std_cdf(x: Any, mus: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + erf((x - mus) / np.maximum(math.sqrt(2) * sigmas, SIGMA_FLOOR)))


_VECTORISED = {"GMM1_lpdf": hepopt_gmm1_lpdf, "LGMM1_lpdf": hepopt_lgmm1_lpdf, "ap_split_trials": hepopt_split_trials}
for _impl in _VECTORISED.values():
    if not hasattr(scope, _impl.__name__):  # a module reload must not register twice
        scope.define(_impl)
