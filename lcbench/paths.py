"""Where lcbench keeps what it downloads or computes once per machine: ``$LCBENCH_CACHE``
(default ``~/.cache/lcbench``), one sub-folder per kind (data, models, calibration, minference)."""

from __future__ import annotations

import os
from pathlib import Path


def lcbench_cache(*parts: str) -> Path:
    """``$LCBENCH_CACHE/<parts...>`` (default ``~/.cache/lcbench``), user-expanded; not created."""
    return Path(os.environ.get("LCBENCH_CACHE", Path.home() / ".cache" / "lcbench")).expanduser().joinpath(*parts)
