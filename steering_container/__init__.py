"""The steering container: proposes hyperparameter points (and, later, decides early stopping)."""

from steering_container.api import Observation, propose

__all__ = ["Observation", "propose"]
