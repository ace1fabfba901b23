"""The hyperparameters one evaluation trains with: the bare point dict of ``input.json`` (DESIGN.md §3.4, §4).

Every knob of the published MLPF scan is here, plus batch size and epochs. Validation is strict and
refuses unknown keys, so a misspelt hyperparameter fails the point instead of silently training the
default. Steering tools such as hyperopt's ``quniform`` hand out integral floats (``2.0``) for integer
knobs; those are accepted, fractional values are not.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hepopt.errors import SpecError
from hepopt.task import read_json, validation_problems

MAX_GRAPH_LAYERS = 8  # the scan uses 0..4; more is allowed but rarely sensible
MAX_BIN_SIZE = 1024
MAX_OUTPUT_DIM = 4096
MAX_BATCH_SIZE = 4096
MAX_EPOCHS = 100_000
MAX_LEARNING_RATE = 1.0

INTEGER_FIELDS = ("num_graph_layers_id", "num_graph_layers_reg", "bin_size", "output_dim", "batch_size", "epochs")


class HyperParams(BaseModel):
    """One point of the MLPF search space; defaults give a small model that trains in seconds on a CPU."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    lr: float = Field(1e-3, gt=0, le=MAX_LEARNING_RATE, description="initial Adam learning rate")
    num_graph_layers_id: int = Field(2, ge=0, le=MAX_GRAPH_LAYERS, description="graph layers feeding class/charge")
    num_graph_layers_reg: int = Field(2, ge=0, le=MAX_GRAPH_LAYERS, description="graph layers feeding regression")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout rate in graph layers and heads")
    bin_size: int = Field(32, ge=2, le=MAX_BIN_SIZE, description="elements per LSH bin")
    output_dim: int = Field(128, ge=1, le=MAX_OUTPUT_DIM, description="width of a graph convolution")
    weight_decay: float = Field(0.0, ge=0, le=1, description="> 0 switches Adam to AdamW")
    batch_size: int = Field(4, ge=1, le=MAX_BATCH_SIZE, description="events per training step")
    epochs: int = Field(2, ge=1, le=MAX_EPOCHS)

    @field_validator(*INTEGER_FIELDS, mode="before")
    @classmethod
    def _integral_float_is_int(cls, value: Any) -> Any:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        return value

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_hyperparams(data: Any, source: str | None = None) -> HyperParams:
    """Validate a decoded point dict; every problem is reported with its key."""
    if not isinstance(data, dict):
        raise SpecError([("", f"hyperparameters are a JSON object, got {type(data).__name__}")], source)
    try:
        return HyperParams.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_problems(exc), source) from None


def load_hyperparams(path: Path) -> HyperParams:
    """Read ``input.json``; a missing/malformed file or a bad key raises SpecError naming file and key."""
    path = Path(path)
    return parse_hyperparams(read_json(path, what="hyperparameter"), source=str(path))
