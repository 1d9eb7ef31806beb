"""The uncompressed reference."""

from .base import Stage


class Full(Stage):
    """Keeps the whole KV cache: the reference every method is compared with."""

    name = "full"
    family = "baseline"
    summary = "no compression (reference)"
    stages = ()
