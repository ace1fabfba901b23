import numpy as np
import pytest

from evaluation_container.data import format as fmt
from evaluation_container.physics import PhysicsAccumulator, resolution


def _event(true_classes, predicted_classes, true_pt, predicted_pt):
    n = len(true_classes)
    y = np.zeros((1, n, fmt.N_Y_COLUMNS), np.float32)
    y[0, :, fmt.Y_CLASS] = true_classes
    y[0, :, fmt.Y_PT] = true_pt
    y[0, :, fmt.Y_E] = true_pt
    y[0, :, fmt.Y_COS_PHI] = 1.0
    pt = np.asarray(predicted_pt, np.float32)[None]
    return dict(y=y, mask=np.ones((1, n), bool), predicted_class=np.asarray(predicted_classes)[None], pt=pt,
                energy=pt, sin_phi=np.zeros((1, n)), cos_phi=np.ones((1, n)))


def test_efficiency_and_fake_rate_per_class():
    accumulator = PhysicsAccumulator()
    ch, ph = fmt.CLASS_CHARGED_HADRON, fmt.CLASS_PHOTON
    # 4 true charged hadrons, 3 found; 1 photon found; 1 "none" predicted as photon (a fake)
    accumulator.add(**_event([ch, ch, ch, ch, ph, 0], [ch, ch, ch, 0, ph, ph], [1, 1, 1, 1, 1, 1], [1] * 6))
    figures = accumulator.result()
    assert figures["eff_ch_had"] == pytest.approx(0.75)
    assert figures["fake_ch_had"] == 0.0
    assert figures["eff_photon"] == 1.0
    assert figures["fake_photon"] == pytest.approx(0.5)
    assert "eff_electron" not in figures and "fake_muon" not in figures


def test_batches_add_up():
    one, two = PhysicsAccumulator(), PhysicsAccumulator()
    a = _event([1, 1], [1, 0], [2, 4], [2, 4])
    b = _event([1, 2], [1, 2], [1, 3], [1.5, 3])
    for event in (a, b):
        one.add(**event)
    two.add(**{key: np.concatenate([a[key], b[key]]) for key in a})  # one batch of both events
    assert one.result() == two.result()
    assert one.result()["eff_ch_had"] == pytest.approx(2 / 3)


def test_pt_resolution_is_the_relative_68_percent_width():
    rng = np.random.default_rng(0)
    true = rng.uniform(5, 50, 20000)
    predicted = true * rng.normal(1.0, 0.1, true.size)
    accumulator = PhysicsAccumulator()
    accumulator.add(**_event(np.ones(true.size), np.ones(true.size), true, predicted))
    figures = accumulator.result()
    assert figures["pt_response"] == pytest.approx(1.0, abs=0.01)
    assert figures["pt_resolution"] == pytest.approx(0.1, rel=0.05)
    assert figures["e_resolution"] == pytest.approx(0.1, rel=0.05)


def test_met_response_of_a_lost_particle():
    """Two back-to-back particles balance; losing one makes the predicted MET equal its pT."""
    event = _event([1, 1], [1, 1], [10, 10], [10, 10])
    event["y"][0, 1, fmt.Y_COS_PHI] = -1.0
    event["cos_phi"] = np.array([[1.0, -1.0]])
    event["predicted_class"] = np.array([[1, 0]])
    event["y"][0, 0, fmt.Y_PT] = 12.0  # true MET 2, predicted MET 10
    accumulator = PhysicsAccumulator()
    accumulator.add(**event)
    assert accumulator.result()["met_response"] == pytest.approx(5.0)


def test_resolution_is_undefined_for_non_positive_median():
    assert resolution(np.array([-1.0, -2.0, 0.5])) is None
    # quantiles 0.932 and 1.068 (linear interpolation), median 1
    assert resolution(np.array([0.9, 1.0, 1.1])) == pytest.approx(0.068)
