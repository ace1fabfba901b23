"""The small default dataset, generated on first use into a cache directory and reused after.

The directory name carries the generator version and a hash of the settings, so a change of either
gives a fresh dataset instead of stale files. Generation happens in a temporary sibling directory that
is renamed into place, so concurrent first uses never see (or leave) a half-written dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .generator import GENERATOR_VERSION, generate_dataset

DATA_DIR_ENV = "HEPOPT_DATA_DIR"
CACHE_SUBDIR = "mlpf_toy"
MANIFEST = "manifest.json"
DEFAULT_SETTINGS = {"files": 4, "events_per_file": 25, "seed": 0, "min_elements": 100, "max_elements": 400}


def cache_root() -> Path:
    """``$HEPOPT_DATA_DIR``, else ``$XDG_CACHE_HOME/hepopt``, else ``~/.cache/hepopt``."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hepopt"


def dataset_key(settings: dict[str, int]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"v{GENERATOR_VERSION}-seed{settings['seed']}-{digest}"


def default_dataset(root: str | Path | None = None, **overrides: int) -> Path:
    """Directory of the default toy dataset (see DEFAULT_SETTINGS), generating it if absent."""
    settings = {**DEFAULT_SETTINGS, **overrides}
    target = Path(root) if root is not None else cache_root()
    target = target / CACHE_SUBDIR / dataset_key(settings)
    if (target / MANIFEST).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        files = generate_dataset(staging, **settings)
        manifest = {"generator_version": GENERATOR_VERSION, **settings, "files": [f.name for f in files]}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(staging: Path, target: Path) -> None:
    """Rename into place; when another process got there first, keep its (identical) copy."""
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / MANIFEST).is_file():
            raise
