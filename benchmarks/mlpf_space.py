"""The MLPF hyperparameter scan of DESIGN.md §4, in hpogrid dialect: the one definition benchmarks share.

The layer counts are ``uniformint`` (their order matters to the model) while ``bin_size`` and
``output_dim`` are unordered categoricals, as in the published scan.
"""

from __future__ import annotations

from typing import Any

MLPF_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"method": "loguniform", "dimension": {"low": 1e-6, "high": 3e-2}},
    "num_graph_layers_id": {"method": "uniformint", "dimension": {"low": 0, "high": 4}},
    "num_graph_layers_reg": {"method": "uniformint", "dimension": {"low": 0, "high": 4}},
    "dropout": {"method": "uniform", "dimension": {"low": 0.0, "high": 0.5}},
    "bin_size": {"method": "categorical", "dimension": {"categories": [8, 16, 32, 64, 128]}},
    "output_dim": {"method": "categorical", "dimension": {"categories": [8, 16, 32, 64, 128, 256]}},
    "weight_decay": {"method": "loguniform", "dimension": {"low": 1e-6, "high": 1e-1}},
}
