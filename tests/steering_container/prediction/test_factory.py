"""make_predictor: the names the predictive stopping policy and the benchmarks use."""

from __future__ import annotations

import pytest

from steering_container.prediction import (
    PREDICTORS,
    CurvePredictor,
    QSVREnsemble,
    QSVRPredictor,
    SVRPredictor,
    make_predictor,
)


@pytest.mark.parametrize(("name", "cls"), [("svr", SVRPredictor), ("qsvr", QSVRPredictor),
                                           ("qsvr-ensemble", QSVREnsemble)])
def test_each_name_builds_its_predictor_with_its_options(name: str, cls: type) -> None:
    predictor = make_predictor(name, gamma=0.2)
    assert type(predictor) is cls
    assert isinstance(predictor, CurvePredictor)
    assert set(PREDICTORS) == {"svr", "qsvr", "qsvr-ensemble"}


def test_an_unknown_name_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="unknown predictor 'gp'"):
        make_predictor("gp")


@pytest.mark.parametrize("name", ["svr", "qsvr", "qsvr-ensemble"])
def test_an_unknown_option_is_a_value_error_naming_it(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}.kernel_size: unknown option"):
        make_predictor(name, kernel_size=3)


def test_a_bad_option_value_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"qsvr\.bits"):
        make_predictor("qsvr", bits=0)
