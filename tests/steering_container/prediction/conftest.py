"""Shared inputs of the predictor tests: small synthetic problems and the real MLPF curves."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

#: benchmarks/ is not an installed package: import its loader from the repository, whatever pytest's cwd.
REPOSITORY = Path(__file__).resolve().parents[3]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))
replay = importlib.import_module("benchmarks.replay_mlpf_curves")


@pytest.fixture(scope="session")
def mlpf_curves() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hyperparameters, losses after epochs 0, 2, …, 24, final losses) of the 295 kept curves."""
    if not replay.CURVES_PATH.is_file():
        pytest.fail(f"MLPF learning curves not found at {replay.CURVES_PATH}: put mlpf_delphes_296.csv (from "
                    "erwulff/performance-pred, data/mlpf/delphes_trainings_processed.csv) there")
    data = replay.load_curves()
    return data.hparams, data.observed, data.final


def _synthetic_curves(n: int, seed: int = 0, epochs: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hparams = rng.uniform(0, 1, size=(n, 2))
    level = 1 + hparams[:, 0] + 0.1 * rng.normal(size=n)
    curves = level[:, None] + np.exp(-np.arange(epochs))[None, :] * (1 + hparams[:, 1:2])
    return hparams, curves, level


@pytest.fixture
def synthetic_curves() -> Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(n, seed=0, epochs=6) -> decaying curves whose final value follows their level: learnable, quick to fit."""
    return _synthetic_curves
