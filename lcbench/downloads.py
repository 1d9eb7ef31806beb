"""Plain HTTP downloads outside the Hugging Face hub (essays, DuoAttention's trained patterns):
``LCBENCH_MIRROR`` points them at a mirror (``{mirror}/{host}/{path}``; the tests' loopback
stand-in), ``LCBENCH_OFFLINE`` / ``HF_HUB_OFFLINE`` forbid them."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

TIMEOUT_S = 30


def downloads_disabled() -> str | None:
    """The variable that forbids downloads, if one is set."""
    for name in ("LCBENCH_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(name, "") not in ("", "0", "false", "False"):
            return name
    return None


def mirrored(url: str) -> str:
    base = os.environ.get("LCBENCH_MIRROR")
    if not base:
        return url
    rest = url.split("://", 1)[1]
    return f"{base.rstrip('/')}/{rest}"


def fetch(url: str) -> bytes:
    """The body of ``url`` (through ``LCBENCH_MIRROR`` when set); raises OSError on failure."""
    request = urllib.request.Request(mirrored(url), headers={"User-Agent": "lcbench"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return response.read()


def network_down(exc: Exception) -> bool:
    """A failure that means no connection at all (DNS, refused, timeout), not a missing page."""
    return isinstance(exc, (urllib.error.URLError, TimeoutError, ConnectionError)) and not isinstance(
        exc, urllib.error.HTTPError)
