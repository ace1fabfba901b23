"""QSVR on the simulated annealer: as good as the classical SVR on the bit grid, and usable as a predictor."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import dimod
import numpy as np
import pytest
from sklearn.svm import SVR

from hepopt.errors import SpecError
from steering_container.prediction import QSVRPredictor
from steering_container.prediction.base import MIN_TRAINING_ROWS
from steering_container.prediction.qubo import qubo_energy
from steering_container.prediction.samplers import resolve_sampler

Curves = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
#: Reads and sweeps that keep these tests at a second or two on a loaded 2-core machine.
FAST = {"num_reads": 50, "sample_options": {"num_sweeps": 500}}


def classical_projected_energy(model: QSVRPredictor) -> float:
    """Energy of sklearn's exact SVR solution on the same kernel, rounded onto the K-bit grid."""
    dual, encoding = model.dual_, model.encoding
    exact = SVR(kernel="precomputed", C=encoding.upper, epsilon=dual.epsilon, tol=1e-8).fit(dual.kernel, dual.target)
    d = np.zeros(dual.target.size)
    d[exact.support_] = exact.dual_coef_[0]
    bits = np.concatenate([encoding.nearest_bits(np.maximum(d, 0)), encoding.nearest_bits(np.maximum(-d, 0))])
    return float(qubo_energy(model.qubo_, bits))


@pytest.mark.parametrize("seed", range(3))
def test_annealer_lowest_energy_is_at_most_that_of_the_classical_solution_on_the_bit_grid(
        seed: int, synthetic_curves: Curves) -> None:
    hparams, curves, final = synthetic_curves(12, seed=seed)
    model = QSVRPredictor(seed=seed, **FAST).fit(hparams, curves, final)
    assert model.lowest_energy_ <= classical_projected_energy(model) + 1e-9


def test_lowest_combination_keeps_the_exact_minimum_found_by_an_exhaustive_sampler(synthetic_curves: Curves) -> None:
    """Any dimod sampler plugs in; dimod's ExactSolver enumerates all 2^10 states of 5 rows × 2 × 1 bit."""
    hparams, curves, final = synthetic_curves(MIN_TRAINING_ROWS)
    model = QSVRPredictor(bits=1, base=1.0, sampler=dimod.ExactSolver(), num_reads=1, combine="lowest",
                          sample_options={}).fit(hparams, curves, final)
    states = (np.arange(2**10)[:, None] >> np.arange(10)) & 1
    assert model.lowest_energy_ == pytest.approx(qubo_energy(model.qubo_, states).min())
    assert set(np.concatenate([model.alpha_, model.alpha_star_])) <= {0.0, 1.0}


@pytest.mark.parametrize("combine", ["lowest", "mean", "weighted"])
def test_every_combination_learns_the_synthetic_target(combine: str, synthetic_curves: Curves) -> None:
    hparams, curves, final = synthetic_curves(20, seed=1)
    model = QSVRPredictor(combine=combine, top_k=5, gamma=1.0, seed=0, **FAST).fit(hparams, curves, final)
    test_hp, test_curves, test_final = synthetic_curves(40, seed=2)
    error = np.abs(model.predict(test_hp, test_curves) - test_final).mean()
    assert error < 0.5 * np.abs(test_final - final.mean()).mean()


def test_the_fit_is_reproducible_with_a_seed(synthetic_curves: Curves) -> None:
    hparams, curves, final = synthetic_curves(10)
    first = QSVRPredictor(seed=7, **FAST).fit(hparams, curves, final).predict(hparams, curves)
    second = QSVRPredictor(seed=7, **FAST).fit(hparams, curves, final).predict(hparams, curves)
    assert first.tolist() == second.tolist()


@pytest.mark.parametrize(("options", "key"), [
    ({"gamma": 0.0}, "qsvr.gamma"), ({"gamma": -1.0}, "qsvr.gamma"), ({"base": 0.0}, "qsvr.base"),
    ({"base": -0.5}, "qsvr.base"), ({"bits": 0}, "qsvr.bits"), ({"epsilon": -0.1}, "qsvr.epsilon"),
    ({"penalty": -1.0}, "qsvr.penalty"), ({"combine": "median"}, "qsvr.combine"), ({"top_k": 0}, "qsvr.top_k"),
    ({"num_reads": 0}, "qsvr.num_reads"), ({"sampler": "quantum"}, "qsvr.sampler"),
    ({"sampler": object()}, "qsvr.sampler"), ({"feature_scaling": "zscore"}, "feature_scaling"),
])
def test_bad_parameters_are_named(options: dict, key: str, synthetic_curves: Curves) -> None:
    with pytest.raises(SpecError, match=key):
        QSVRPredictor(**options).fit(*synthetic_curves(MIN_TRAINING_ROWS))


def test_too_little_history_is_a_clear_error(synthetic_curves: Curves) -> None:
    hparams, curves, final = synthetic_curves(MIN_TRAINING_ROWS - 1)
    with pytest.raises(SpecError, match=f"too little history: {MIN_TRAINING_ROWS - 1} training row"):
        QSVRPredictor(**FAST).fit(hparams, curves, final)
    hparams, curves, final = synthetic_curves(10, epochs=2)
    with pytest.raises(SpecError, match=r"qsvr\.fit\.curves: too little history"):
        QSVRPredictor(**FAST).fit(hparams, curves, final)


def test_predicting_needs_a_fit_and_the_same_number_of_epochs(synthetic_curves: Curves) -> None:
    hparams, curves, final = synthetic_curves(10)
    with pytest.raises(SpecError, match="call fit"):
        QSVRPredictor().predict(hparams, curves)
    model = QSVRPredictor(**FAST).fit(hparams, curves, final)
    with pytest.raises(SpecError, match="5 epochs given, the model was fitted on 6"):
        model.predict(hparams, curves[:, :5])


def test_the_dwave_sampler_without_dwave_system_says_how_to_get_it(
        monkeypatch: pytest.MonkeyPatch, synthetic_curves: Curves) -> None:
    monkeypatch.setitem(sys.modules, "dwave.system", None)  # import fails as if the package were absent
    with pytest.raises(SpecError, match=r"pip install dwave-system.*DWAVE_API_TOKEN"):
        QSVRPredictor(sampler="dwave").fit(*synthetic_curves(MIN_TRAINING_ROWS))


def test_the_dwave_sampler_is_dwave_systems_own_with_the_configured_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """No token passes through hepopt: DWaveSampler reads its own configuration; options such as solver pass."""
    fake = types.ModuleType("dwave.system")
    fake.DWaveSampler = lambda **options: ("qpu", options)  # type: ignore[attr-defined]
    fake.EmbeddingComposite = lambda child: ("embedded", child)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dwave.system", fake)
    assert resolve_sampler("dwave", {"solver": "Advantage_system4.1"}) == (
        "embedded", ("qpu", {"solver": "Advantage_system4.1"}))
