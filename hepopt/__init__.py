"""hepopt core: task spec, search spaces, errors, and the `hepopt` command-line entry."""

from hepopt.errors import HepoptError, SpecError
from hepopt.space import Dimension, SearchSpace
from hepopt.task import Task, load_task, parse_task

__all__ = ["Dimension", "HepoptError", "SearchSpace", "SpecError", "Task", "load_task", "parse_task"]
__version__ = "0.1.0"
