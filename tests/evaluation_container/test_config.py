import json

import pytest

from evaluation_container.config import HyperParams, load_hyperparams, parse_hyperparams
from hepopt.errors import SpecError

SCAN_POINT = {"lr": 3.2e-4, "num_graph_layers_id": 3, "num_graph_layers_reg": 0, "dropout": 0.27, "bin_size": 128,
              "output_dim": 256, "weight_decay": 1.5e-5, "batch_size": 8, "epochs": 5}


def test_every_published_hyperparameter_is_read_from_input_json(tmp_path):
    path = tmp_path / "input.json"
    path.write_text(json.dumps(SCAN_POINT))
    assert load_hyperparams(path).to_json() == SCAN_POINT


def test_defaults_fill_missing_keys():
    params = parse_hyperparams({"lr": 0.01})
    assert params.lr == 0.01
    assert params.to_json() == {**HyperParams().to_json(), "lr": 0.01}


def test_integral_floats_from_quniform_count_as_integers():
    params = parse_hyperparams({"bin_size": 32.0, "num_graph_layers_id": 0.0})
    assert (params.bin_size, params.num_graph_layers_id) == (32, 0)
    assert isinstance(params.bin_size, int)


@pytest.mark.parametrize(("point", "key", "message"), [
    ({"learning_rate": 0.1}, "learning_rate", "unknown key"),
    ({"bin_size": 16.5}, "bin_size", "integer"),
    ({"bin_size": True}, "bin_size", "integer"),
    ({"lr": "1e-3"}, "lr", "number"),
    ({"lr": 0}, "lr", "greater than 0"),
    ({"dropout": 1.0}, "dropout", "less than 1"),
    ({"num_graph_layers_reg": -1}, "num_graph_layers_reg", "greater than or equal to 0"),
    ({"epochs": 0}, "epochs", "greater than or equal to 1"),
])
def test_bad_point_is_refused_naming_file_and_key(tmp_path, point, key, message):
    path = tmp_path / "input.json"
    path.write_text(json.dumps(point))
    with pytest.raises(SpecError) as caught:
        load_hyperparams(path)
    assert str(path) in str(caught.value)
    assert f"{key}: " in str(caught.value)
    assert message in str(caught.value)


def test_several_problems_are_reported_together():
    with pytest.raises(SpecError) as caught:
        parse_hyperparams({"lr": -1.0, "typo": 1})
    assert {location for location, _ in caught.value.problems} == {"lr", "typo"}


@pytest.mark.parametrize(("content", "message"), [
    (None, "not found"),
    ("", "empty"),
    ('{"lr": 0.1,\n "bin_size": }', "line 2"),
    ("[1, 2]", "JSON object"),
])
def test_unreadable_file_is_refused_with_location(tmp_path, content, message):
    path = tmp_path / "input.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SpecError) as caught:
        load_hyperparams(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)
