"""lcbench: one harness for long-context compression methods.

The data flow (DESIGN.md): a task yields samples, a method chain compresses the prompt text,
the prefill attention and the KV cache, the engine decodes every turn, and the results store
keeps one record per turn with quality, latency and memory side by side.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout, when lcbench runs from one
# True for a source checkout (editable install); False for an installed wheel, whose REPO_ROOT is
# site-packages' parent (possibly inside some other project's git repository)
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "tasks").is_dir()
PROTOCOL_KINDS = ("tasks",)


def protocol_file(kind: str, name: str):
    """The protocol data file ``<kind>/<name>`` (``kind`` is ``tasks``).

    A built wheel carries the top-level ``tasks/`` folder as ``lcbench/_protocol/<kind>/`` (copied by the build hook in ``setup.py``), read through
    ``importlib.resources``; an editable install from a checkout reads the folders themselves.
    Returns a path-like object with ``read_text``/``read_bytes``/``open``.
    """
    if kind not in PROTOCOL_KINDS:
        raise ValueError(f"protocol kind {kind!r} is not one of {PROTOCOL_KINDS}")
    packaged = resources.files(__name__).joinpath("_protocol", kind, name)
    if packaged.is_file():
        return packaged
    checkout = REPO_ROOT / kind / name
    if checkout.is_file():
        return checkout
    raise FileNotFoundError(
        f"protocol file {kind}/{name} is missing from this lcbench installation (looked in the package's "
        f"_protocol/{kind}/ and in {REPO_ROOT / kind}). Fix: reinstall lcbench from a wheel or a checkout "
        f"(`pip install lcbench` or `pip install .`); a wheel built by setup.py's hook carries the file."
    )
