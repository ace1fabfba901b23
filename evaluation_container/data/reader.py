"""Read (and refuse) files in the Zenodo Delphes MLPF format.

Pickles can run arbitrary code when loaded, and training files come from grid storage, so unpickling
goes through a whitelist that admits only numpy array reconstruction and plain containers. Every
refusal names the file, the event and what was expected, so a user can find the broken file among
hundreds without a traceback.
"""

from __future__ import annotations

import bz2
import io
import json
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hepopt.errors import SpecError

from . import format as fmt

BZ2_MAGIC = b"BZh"

# (module, name) pairs a data pickle may reference; numpy.core is numpy 1.x's name for numpy._core.
_ALLOWED_GLOBALS = frozenset({
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
})


class DataError(SpecError):
    """A training file that is not in the expected format; ``file`` and ``event`` locate the problem."""

    def __init__(self, file: str | Path, message: str, event: int | None = None, key: str | None = None):
        self.file = str(file)
        self.event = event
        location = ", ".join(part for part in (_event_label(event), key) if part)
        super().__init__([(location, message)], source=self.file)


def _event_label(event: int | None) -> str:
    return "" if event is None else f"event {event}"


@dataclass(frozen=True)
class Event:
    """One event: ``X`` (n, 12) input elements, ``ygen``/``ycand`` (n, 7) targets, all float32."""

    X: np.ndarray
    ygen: np.ndarray
    ycand: np.ndarray

    def __len__(self) -> int:
        return int(self.X.shape[0])


@dataclass(frozen=True)
class Dataset:
    """The events of a list of files, in file order."""

    files: tuple[Path, ...]
    events: tuple[Event, ...]

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __getitem__(self, index: int) -> Event:
        return self.events[index]

    @property
    def n_elements(self) -> int:
        return sum(len(event) for event in self.events)

    def class_counts(self, target: str = "ygen") -> np.ndarray:
        """How many elements carry each target class (index = class id)."""
        counts = np.zeros(fmt.N_CLASSES, dtype=np.int64)
        for event in self.events:
            classes = getattr(event, target)[:, fmt.Y_CLASS].astype(np.int64)
            counts += np.bincount(classes, minlength=fmt.N_CLASSES)
        return counts


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global outside ``_ALLOWED_GLOBALS`` instead of importing it."""

    def find_class(self, module: str, name: str) -> object:
        normalised = re.sub(r"^numpy\.core\b", "numpy._core", module)
        if (normalised, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name} (only numpy arrays and containers)")
        return super().find_class(normalised, name)


def read_file(path: str | Path) -> list[Event]:
    """All events of one ``.pkl.bz2`` file, validated; raises DataError naming file and event."""
    path = Path(path)
    content = _unpickle(path, _decompress(path))
    return _events(path, content)


def _decompress(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from exc
    if not raw:
        raise DataError(path, "empty file; expected a bz2-compressed pickle")
    if not raw.startswith(BZ2_MAGIC):
        raise DataError(path, "not a bz2 file (no 'BZh' header); expected a bz2-compressed pickle")
    try:
        return bz2.decompress(raw)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(path, f"corrupt or truncated bz2 stream ({exc}); expected a complete bz2 file") from exc


def _unpickle(path: Path, payload: bytes) -> object:
    try:
        return _RestrictedUnpickler(io.BytesIO(payload)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError) as exc:
        raise DataError(path, f"not a valid data pickle ({exc}); expected a pickled dict of lists of arrays") from exc


def _events(path: Path, content: object) -> list[Event]:
    expected = "a dict with keys " + ", ".join(repr(key) for key in fmt.KEYS)
    if not isinstance(content, dict):
        raise DataError(path, f"pickle holds a {type(content).__name__}; expected {expected}")
    missing = [key for key in fmt.KEYS if key not in content]
    if missing:
        raise DataError(path, f"missing key(s) {', '.join(map(repr, missing))}; expected {expected}")
    lists = {key: content[key] for key in fmt.KEYS}
    for key, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise DataError(path, f"{key!r} is a {type(value).__name__}; expected a list of per-event arrays")
    lengths = {key: len(value) for key, value in lists.items()}
    if len(set(lengths.values())) != 1:
        found = ", ".join(f"{key}: {n}" for key, n in lengths.items())
        raise DataError(path, f"lists of different lengths ({found}); expected one entry per event in each")
    if lengths["X"] == 0:
        raise DataError(path, "no events; expected at least one")
    return [_event(path, i, *(lists[key][i] for key in fmt.KEYS)) for i in range(lengths["X"])]


def _event(path: Path, index: int, x: object, ygen: object, ycand: object) -> Event:
    arrays = {
        "X": _matrix(path, index, "X", x, fmt.N_X_COLUMNS),
        "ygen": _matrix(path, index, "ygen", ygen, fmt.N_Y_COLUMNS),
        "ycand": _matrix(path, index, "ycand", ycand, fmt.N_Y_COLUMNS),
    }
    rows = {key: array.shape[0] for key, array in arrays.items()}
    if len(set(rows.values())) != 1:
        found = ", ".join(f"{key}: {n}" for key, n in rows.items())
        raise DataError(path, f"row counts differ ({found}); expected one target row per element", index)
    _check_codes(path, index, "X", arrays["X"][:, fmt.X_TYPE], fmt.ELEMENT_TYPES, "element type (column 0)")
    for key in fmt.TARGET_KEYS:
        _check_codes(path, index, key, arrays[key][:, fmt.Y_CLASS], range(fmt.N_CLASSES), "class (column 0)")
    return Event(**arrays)


def _matrix(path: Path, index: int, key: str, value: object, columns: int) -> np.ndarray:
    expected = f"expected a 2-D numeric array with {columns} columns"
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"not numeric ({exc}); {expected}", index, key) from exc
    if array.ndim != 2:
        raise DataError(path, f"array of shape {array.shape}; {expected}", index, key)
    if array.shape[1] != columns:
        raise DataError(path, f"{array.shape[1]} columns; {expected}", index, key)
    bad = ~np.isfinite(array)
    if bad.any():
        row, column = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(path, f"non-finite value {array[row, column]} at row {row}, column {column}; "
                              "expected finite numbers", index, key)
    return array


def _check_codes(path: Path, index: int, key: str, codes: np.ndarray, allowed: Sequence[int], what: str) -> None:
    bad = ~np.isin(codes, np.asarray(allowed, dtype=np.float32))
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(path, f"{what} {codes[row]:g} at row {row}; expected one of {list(allowed)}", index, key)


def read_input_ds(path: str | Path = "input_ds.json") -> list[Path]:
    """The file list of a runHPO ``input_ds.json``: a JSON list of paths, relative to the working directory."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(path, "no such file; expected a JSON list of training files") from exc
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if not isinstance(entries, list) or not entries:
        raise DataError(path, "expected a non-empty JSON list of training file paths")
    problems = [(f"[{i}]", f"expected a path string, got {type(entry).__name__}")
                for i, entry in enumerate(entries) if not isinstance(entry, str) or not entry]
    if problems:
        raise SpecError(problems, source=str(path))
    return [Path(entry) for entry in entries]


def resolve_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Data files named by a directory, an ``input_ds.json``, one file, or a list of files/directories."""
    if isinstance(source, (str, Path)):
        source = Path(source)
        if source.suffix == ".json":
            return resolve_files(read_input_ds(source))
        source = [source]
    files: list[Path] = []
    for entry in map(Path, source):
        files.extend(_directory_files(entry) if entry.is_dir() else [entry])
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise DataError(missing[0], f"no such data file ({len(missing)} missing in all)")
    if not files:
        raise DataError(", ".join(map(str, source)) or "<nothing>", "no data files given")
    return files


def _directory_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob(fmt.FILE_GLOB), key=_natural_key)
    if not files:
        raise DataError(directory, f"directory holds no {fmt.FILE_GLOB} files")
    return files


def _natural_key(path: Path) -> list[object]:
    """Sort ``..._1_10`` after ``..._1_9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_dataset(source: str | Path | Sequence[str | Path]) -> Dataset:
    """Read every event of a directory, an ``input_ds.json``, a file, or a list of files."""
    files = resolve_files(source)
    return Dataset(files=tuple(files), events=tuple(iter_events(files)))


def iter_events(source: str | Path | Sequence[str | Path]) -> Iterator[Event]:
    """The same events as ``load_dataset``, one file in memory at a time (for full-size datasets)."""
    for file in resolve_files(source):
        yield from read_file(file)
