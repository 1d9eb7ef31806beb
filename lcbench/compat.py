"""What differs between the Python versions lcbench supports (``requires-python >= 3.10``).

``tomllib`` (TOML reading: the protocol files, sweep grids) is in the standard library from 3.11;
on 3.10 its backport ``tomli``, the same parser under another name, is a dependency of lcbench
there (pyproject's ``python_version < '3.11'`` marker).
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["tomllib"]
