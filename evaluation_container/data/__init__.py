"""MLPF training data in the Zenodo Delphes format (DESIGN.md §4): reader, toy generator, default dataset."""

from .cache import default_dataset
from .generator import generate_dataset, generate_events
from .reader import (
    DataError,
    Dataset,
    Event,
    iter_events,
    load_dataset,
    read_file,
    read_input_ds,
    resolve_files,
)

__all__ = [
    "DataError",
    "Dataset",
    "Event",
    "default_dataset",
    "generate_dataset",
    "generate_events",
    "iter_events",
    "load_dataset",
    "read_file",
    "read_input_ds",
    "resolve_files",
]
