"""SVR training written as a QUBO (DESIGN.md §5), its decoding and the bias from free support vectors.

Each dual coefficient is a K-bit number in base B: α_n = Σ_k B^k a_nk, α*_n = Σ_k B^k b_nk. The energy
of a bit vector is the (negated) ε-SVR dual with the equality constraint Σ(α − α*) = 0 as a penalty:

    E = ½ (α−α*)ᵀ K (α−α*) + ε Σ(α+α*) − yᵀ(α−α*) + ξ (Σ(α−α*))²

so the lowest-energy bit vector is the best SVR on the bit grid. Bits are ordered [a_00 … a_(N-1)(K-1),
b_00 … b_(N-1)(K-1)], i.e. coefficient n's bits are contiguous, α bits before α* bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hepopt.errors import SpecError

#: Coefficients closer than this (relative to the largest value) to 0 or to C count as at a bound.
BOUND_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Encoding:
    """How K bits in base B make one coefficient; C = Σ_k B^k is the largest value (the box bound)."""

    bits: int
    base: float

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.bits, (int, np.integer)) or self.bits < 1:
            problems.append(("qsvr.bits", f"K must be an integer >= 1, got {self.bits!r}"))
        if not (isinstance(self.base, (int, float, np.number)) and self.base > 0):
            problems.append(("qsvr.base", f"B must be > 0, got {self.base!r}"))
        if problems:
            raise SpecError(problems)

    @property
    def weights(self) -> np.ndarray:
        return float(self.base) ** np.arange(self.bits)

    @property
    def upper(self) -> float:
        """C, the value of a coefficient with every bit set."""
        return float(self.weights.sum())

    def projection(self, n: int) -> np.ndarray:
        """P with d = α − α* = P z for a bit vector z of length 2·n·K."""
        signed = np.kron(np.eye(n), self.weights)
        return np.hstack([signed, -signed])

    def decode(self, z: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """α and α* (each length n) of bit vectors z (…, 2nK)."""
        z = np.asarray(z, dtype=float)
        coefficients = z.reshape(*z.shape[:-1], 2, n, self.bits) @ self.weights
        return coefficients[..., 0, :], coefficients[..., 1, :]

    def nearest_bits(self, values: np.ndarray) -> np.ndarray:
        """The K-bit codes (concatenated) whose values are nearest to ``values``: the projection onto the grid."""
        codes = (np.arange(2**self.bits)[:, None] >> np.arange(self.bits)) & 1
        nearest = np.abs(np.asarray(values, dtype=float)[:, None] - codes @ self.weights).argmin(axis=1)
        return codes[nearest].astype(float).ravel()


@dataclass(frozen=True)
class SVRDual:
    """The (penalised, minimised) SVR dual on one training set: kernel matrix, targets, ε and ξ."""

    kernel: np.ndarray
    target: np.ndarray
    epsilon: float
    penalty: float

    def objective(self, alpha: np.ndarray, alpha_star: np.ndarray) -> np.ndarray:
        """E(α, α*) for one coefficient pair or a batch (…, n)."""
        d = np.asarray(alpha) - np.asarray(alpha_star)
        quadratic = 0.5 * np.einsum("...i,ij,...j->...", d, self.kernel, d)
        return (quadratic + self.epsilon * (np.asarray(alpha) + np.asarray(alpha_star)).sum(-1)
                - d @ self.target + self.penalty * d.sum(-1) ** 2)

    def qubo(self, encoding: Encoding) -> np.ndarray:
        """Upper-triangular Q with zᵀ Q z = E(decode(z)) for every bit vector z (z_i² = z_i folds linear terms)."""
        n = self.target.shape[0]
        p = encoding.projection(n)
        dense = p.T @ (0.5 * self.kernel + self.penalty * np.ones((n, n))) @ p
        linear = self.epsilon * np.abs(p).sum(axis=0) - p.T @ self.target
        q = np.triu(2.0 * dense, k=1)
        q[np.diag_indices_from(q)] = np.diag(dense) + linear
        return q


def qubo_energy(q: np.ndarray, z: np.ndarray) -> np.ndarray:
    """zᵀ Q z for one bit vector or a batch (…, m)."""
    z = np.asarray(z, dtype=float)
    return np.einsum("...i,ij,...j->...", z, q, z)


def free_bias(dual: SVRDual, alpha: np.ndarray, alpha_star: np.ndarray, upper: float) -> float:
    """b from the KKT conditions of the free support vectors, of both kinds.

    A free α_n (0 < α_n < C) puts its point on the upper tube edge, y_n − f(x_n) = ε, so b = y_n − ε − g_n;
    a free α*_n puts it on the lower edge, b = y_n + ε − g_n (g = K(α − α*), the output without bias).
    Every free coefficient votes and b is their mean. When neither set has a member (all coefficients at
    a bound, common on a coarse bit grid) b is the mean residual y − g over all rows instead.
    """
    g = dual.kernel @ (alpha - alpha_star)
    tol = BOUND_TOLERANCE * max(upper, 1.0)
    free_upper = (alpha > tol) & (alpha < upper - tol)
    free_lower = (alpha_star > tol) & (alpha_star < upper - tol)
    votes = np.concatenate([dual.target[free_upper] - dual.epsilon - g[free_upper],
                            dual.target[free_lower] + dual.epsilon - g[free_lower]])
    residuals = votes if votes.size else dual.target - g
    return float(residuals.mean())
