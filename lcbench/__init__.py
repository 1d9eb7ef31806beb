"""lcbench: one harness for long-context compression methods.

The data flow (DESIGN.md): a task yields samples, a method chain compresses the prompt text,
the prefill attention and the KV cache, the engine decodes every turn, and the results store
keeps one record per turn with quality, latency and memory side by side.
"""

from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent


def protocol_file(kind: str, name: str) -> Path:
    """The protocol data file ``<kind>/<name>`` shipped beside the package (``tasks/`` or ``methods/``)."""
    path = REPO_ROOT / kind / name
    if not path.exists():
        raise FileNotFoundError(
            f"protocol file {kind}/{name} is missing: lcbench reads its {kind}/ folder from the "
            f"source tree; install it with `pip install -e .` from a checkout"
        )
    return path
