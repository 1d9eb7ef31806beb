"""Method families as stage components; see :mod:`lcbench.methods.base`."""

from .registry import METHODS

__all__ = ["METHODS"]
