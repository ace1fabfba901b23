"""QSVR: ε-SVR whose dual is solved by an annealer sampling the QUBO of DESIGN.md §5.

An annealer returns many low-energy bit vectors rather than one optimum; how they become one model is
``combine``: ``"lowest"`` keeps the lowest-energy sample, ``"mean"`` averages the coefficients of the
``top_k`` lowest, ``"weighted"`` averages them with weights 1 / (training MSE) so that a sample that fits
its own training rows badly counts little. The bias is then computed from the combined coefficients.
"""

from __future__ import annotations

from typing import Any

import dimod
import numpy as np
from sklearn.metrics.pairwise import rbf_kernel

from hepopt.errors import SpecError
from steering_container.prediction.base import ScaledCurveModel
from steering_container.prediction.features import Scaling
from steering_container.prediction.qubo import Encoding, SVRDual, free_bias, qubo_energy
from steering_container.prediction.samplers import (
    DEFAULT_SIMULATED_READS,
    DEFAULT_SIMULATED_SWEEPS,
    SAMPLER_NAMES,
    Sampler,
    resolve_sampler,
)

COMBINATIONS = ("lowest", "mean", "weighted")
#: RBF γ. On the 100 MLPF tuning splits (benchmarks/replay_mlpf_curves.py) the mean R² rose from 0.892 at
#: the published γ = 0.1 to 0.898 at 0.04-0.05 (0.897 at 0.03 and 0.07; ε 0.005-0.02 and K 3 or 4 moved it
#: by <= 0.0005). Training rows lie a median squared distance of about 6 apart (43 scaled features), so
#: γ = 0.1 gives neighbours a kernel value of 0.54 and 0.05 one of 0.73: a smoother fit of 20 curves.
DEFAULT_GAMMA = 0.05
#: Keeps 1 / MSE finite for a sample that fits its training rows exactly.
MSE_FLOOR = 1e-12


def _number_at_least(value: Any, low: float, strict: bool) -> bool:
    return isinstance(value, (int, float, np.number)) and (value > low if strict else value >= low)


class QSVRPredictor(ScaledCurveModel):
    """Final value of a training from its partial curve, by a QUBO-trained SVR (sklearn-style).

    ``bits`` K and ``base`` B encode each coefficient (largest value C = Σ B^k), ``epsilon`` ε is the
    tube width, ``gamma`` γ the RBF width, ``penalty`` ξ weighs the constraint Σ(α − α*) = 0. K, B, ε and ξ
    are the published settings (DESIGN.md §5); γ is ``DEFAULT_GAMMA``, half the published 0.1, because on
    our feature scaling the wider kernel fitted the MLPF tuning splits better (see the constant).
    ``sampler`` is ``"simulated"``, ``"dwave"`` or a dimod sampler object;
    ``sampler_options`` go to the DWaveSampler constructor, ``sample_options`` to every ``sample()`` call.
    ``seed`` makes the simulated annealer reproducible.
    """

    name = "qsvr"

    def __init__(self, bits: int = 3, base: float = 0.5, epsilon: float = 0.02, gamma: float = DEFAULT_GAMMA,
                 penalty: float = 0.01, sampler: str | Sampler = "simulated", num_reads: int = DEFAULT_SIMULATED_READS,
                 combine: str = "mean", top_k: int = 10, sampler_options: dict[str, Any] | None = None,
                 sample_options: dict[str, Any] | None = None, feature_scaling: str = "mixed",
                 seed: int | None = None) -> None:
        self.bits = bits
        self.base = base
        self.epsilon = epsilon
        self.gamma = gamma
        self.penalty = penalty
        self.sampler = sampler
        self.num_reads = num_reads
        self.combine = combine
        self.top_k = top_k
        self.sampler_options = sampler_options
        self.sample_options = sample_options
        self.feature_scaling = feature_scaling
        Scaling(feature_scaling)  # an unknown scaling fails here rather than at the first fit
        self.seed = seed
        self.encoding = Encoding(bits, base)
        self._check()

    def _check(self) -> None:
        problems = []
        if not _number_at_least(self.gamma, 0, strict=True):
            problems.append(("qsvr.gamma", f"RBF γ must be > 0, got {self.gamma!r}"))
        if not _number_at_least(self.epsilon, 0, strict=False):
            problems.append(("qsvr.epsilon", f"ε must be >= 0, got {self.epsilon!r}"))
        if not _number_at_least(self.penalty, 0, strict=False):
            problems.append(("qsvr.penalty", f"ξ must be >= 0, got {self.penalty!r}"))
        if isinstance(self.sampler, str) and self.sampler not in SAMPLER_NAMES:
            problems.append(("qsvr.sampler", f"unknown sampler {self.sampler!r}; choose one of {SAMPLER_NAMES}"))
        if self.combine not in COMBINATIONS:
            problems.append(("qsvr.combine", f"unknown combination {self.combine!r}; choose one of {COMBINATIONS}"))
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1:
            problems.append(("qsvr.top_k", f"must be an integer >= 1, got {self.top_k!r}"))
        if not isinstance(self.num_reads, (int, np.integer)) or self.num_reads < 1:
            problems.append(("qsvr.num_reads", f"must be an integer >= 1, got {self.num_reads!r}"))
        if problems:
            raise SpecError(problems)

    def _fit_scaled(self, x: np.ndarray, y: np.ndarray) -> None:
        self.support_ = x
        self.dual_ = SVRDual(rbf_kernel(x, gamma=self.gamma), y, self.epsilon, self.penalty)
        self.qubo_ = self.dual_.qubo(self.encoding)
        samples, energies = self._sample(self.qubo_)
        self.alpha_, self.alpha_star_ = self._combine(samples)
        self.intercept_ = free_bias(self.dual_, self.alpha_, self.alpha_star_, self.encoding.upper)
        self.lowest_energy_ = float(energies[0])

    def _sample(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distinct samples, lowest energy first, with energies recomputed from Q (sampler offsets vary)."""
        sampler = resolve_sampler(self.sampler, self.sampler_options)
        accepted = getattr(sampler, "parameters", None)  # dimod samplers list the keywords they take
        parameters = dict(self.sample_options or {})
        if accepted is None or "num_reads" in accepted:
            parameters.setdefault("num_reads", self.num_reads)
        if self.sampler == "simulated":
            parameters.setdefault("num_sweeps", DEFAULT_SIMULATED_SWEEPS)
            if self.seed is not None:
                parameters.setdefault("seed", self.seed)
        result = sampler.sample(dimod.BinaryQuadraticModel(q, "BINARY"), **parameters)
        order = [result.variables.index(i) for i in range(q.shape[0])]
        samples = np.unique(np.asarray(result.record.sample)[:, order], axis=0).astype(float)
        energies = qubo_energy(q, samples)
        ranked = np.argsort(energies, kind="stable")
        return samples[ranked], energies[ranked]

    def _combine(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.support_.shape[0]
        alphas, alpha_stars = self.encoding.decode(samples[: 1 if self.combine == "lowest" else self.top_k], n)
        if self.combine == "weighted":
            weights = 1.0 / np.maximum([self._training_mse(a, s) for a, s in zip(alphas, alpha_stars, strict=True)],
                                       MSE_FLOOR)
        else:
            weights = np.ones(alphas.shape[0])
        weights = weights / weights.sum()
        return weights @ alphas, weights @ alpha_stars

    def _training_mse(self, alpha: np.ndarray, alpha_star: np.ndarray) -> float:
        bias = free_bias(self.dual_, alpha, alpha_star, self.encoding.upper)
        fitted = self.dual_.kernel @ (alpha - alpha_star) + bias
        return float(np.mean((fitted - self.dual_.target) ** 2))

    def _predict_scaled(self, x: np.ndarray) -> np.ndarray:
        return rbf_kernel(x, self.support_, gamma=self.gamma) @ (self.alpha_ - self.alpha_star_) + self.intercept_
