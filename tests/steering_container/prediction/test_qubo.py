"""The QUBO of DESIGN.md §5: its energy is the SVR dual, and the bias comes from free support vectors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.svm import SVR

from hepopt.errors import SpecError
from steering_container.prediction.qubo import Encoding, SVRDual, free_bias, qubo_energy

#: Float tolerance of energies built two ways (summed in a different order).
ENERGY_TOLERANCE = 1e-9


def random_dual(n: int, seed: int, epsilon: float = 0.02, penalty: float = 0.01, gamma: float = 0.5) -> SVRDual:
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, 3))
    return SVRDual(rbf_kernel(x, gamma=gamma), rng.uniform(size=n), epsilon, penalty)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("bits", "base"), [(3, 0.5), (1, 1.0), (4, 2.0), (2, 0.3)])
def test_qubo_energy_of_random_bits_equals_the_dual_objective_of_the_decoded_coefficients(
        seed: int, bits: int, base: float) -> None:
    n = 6
    encoding = Encoding(bits, base)
    dual = random_dual(n, seed, epsilon=0.05 * seed, penalty=0.1 * seed)
    q = dual.qubo(encoding)
    z = np.random.default_rng(100 + seed).integers(0, 2, size=(20, 2 * n * bits))
    alpha, alpha_star = encoding.decode(z, n)
    np.testing.assert_allclose(qubo_energy(q, z), dual.objective(alpha, alpha_star), atol=ENERGY_TOLERANCE)
    assert np.allclose(q, np.triu(q))


def test_decoding_puts_each_coefficients_bits_together_alpha_before_alpha_star() -> None:
    encoding = Encoding(3, 0.5)
    z = np.array([1, 0, 0, 0, 1, 1,   0, 0, 1, 1, 1, 1])  # α_0 = 1, α_1 = 0.75, α*_0 = 0.25, α*_1 = 1.75
    alpha, alpha_star = encoding.decode(z, 2)
    assert alpha.tolist() == [1.0, 0.75]
    assert alpha_star.tolist() == [0.25, 1.75]
    assert encoding.upper == 1.75


def test_projection_onto_the_grid_picks_the_nearest_representable_value() -> None:
    encoding = Encoding(3, 0.5)
    bits = encoding.nearest_bits(np.array([0.0, 0.3, 1.1, 5.0]))
    alpha, _ = encoding.decode(np.concatenate([bits, np.zeros_like(bits)]), 4)
    assert alpha.tolist() == [0.0, 0.25, 1.0, 1.75]


@pytest.mark.parametrize(("bits", "base", "key"), [(0, 0.5, "qsvr.bits"), (2.5, 0.5, "qsvr.bits"),
                                                   (3, 0.0, "qsvr.base"), (3, -1.0, "qsvr.base")])
def test_bad_encodings_are_named(bits: float, base: float, key: str) -> None:
    with pytest.raises(SpecError, match=key):
        Encoding(bits, base)  # type: ignore[arg-type]


# --- bias -------------------------------------------------------------------------------------------
def identity_dual(target: list[float], epsilon: float = 0.1) -> SVRDual:
    return SVRDual(np.eye(len(target)), np.array(target), epsilon, 0.0)


def test_bias_from_a_free_alpha_lies_on_the_upper_tube_edge_and_from_a_free_alpha_star_on_the_lower() -> None:
    dual = identity_dual([1.0, 2.0, 3.0])
    upper = 1.75
    # Row 0: α_0 = 0.5 free -> b = y_0 − ε − g_0 = 1 − 0.1 − 0.5 = 0.4.
    only_upper = free_bias(dual, np.array([0.5, 0.0, 0.0]), np.zeros(3), upper)
    assert only_upper == pytest.approx(0.4)
    # Row 1: α*_1 = 0.25 free -> g_1 = −0.25, b = y_1 + ε − g_1 = 2 + 0.1 + 0.25 = 2.35.
    only_lower = free_bias(dual, np.zeros(3), np.array([0.0, 0.25, 0.0]), upper)
    assert only_lower == pytest.approx(2.35)
    both = free_bias(dual, np.array([0.5, 0.0, 0.0]), np.array([0.0, 0.25, 0.0]), upper)
    assert both == pytest.approx((0.4 + 2.35) / 2)


@pytest.mark.parametrize("value", [0.0, 1.75])
def test_bias_without_free_support_vectors_falls_back_to_the_mean_residual_and_terminates(value: float) -> None:
    dual = identity_dual([1.0, 2.0, 3.0])
    alpha = np.full(3, value)  # every coefficient at a bound: both free sets empty
    bias = free_bias(dual, alpha, np.zeros(3), 1.75)
    assert bias == pytest.approx(np.mean(dual.target - alpha))


def test_bias_matches_sklearn_on_its_own_solution() -> None:
    """sklearn's SVR solves the same dual exactly; the free-SV bias of its coefficients is its intercept."""
    rng = np.random.default_rng(3)
    x, y = rng.uniform(size=(15, 2)), rng.uniform(size=15)
    kernel = rbf_kernel(x, gamma=1.0)
    model = SVR(kernel="precomputed", C=1.75, epsilon=0.02, tol=1e-8).fit(kernel, y)
    d = np.zeros(15)
    d[model.support_] = model.dual_coef_[0]
    bias = free_bias(SVRDual(kernel, y, 0.02, 0.0), np.maximum(d, 0), np.maximum(-d, 0), 1.75)
    assert bias == pytest.approx(model.intercept_[0], abs=1e-4)
