"""hepopt core: task spec, search spaces, errors, client, and the `hepopt` command-line entry.

Names are loaded on first use: a payload that only imports ``hepopt.reporting`` should not pay for
pydantic, and ``hepopt --help`` should stay instant.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "HepoptError": "hepopt.errors", "SpecError": "hepopt.errors",
    "Dimension": "hepopt.space", "SearchSpace": "hepopt.space",
    "Task": "hepopt.task", "load_task": "hepopt.task", "parse_task": "hepopt.task",
    "Client": "hepopt.client",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hepopt' has no attribute {name!r}")
