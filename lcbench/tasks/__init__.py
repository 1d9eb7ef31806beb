"""Task suites: loaders/generators that turn a suite's protocol into samples, and its scorers."""

from .registry import TASKS
from .sample import Sample, Turn

__all__ = ["TASKS", "Sample", "Turn"]
