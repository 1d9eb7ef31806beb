"""The state one forward pass shares with lcbench's attention function (carried beside the model
call: :mod:`.carried`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..cache import KVCache
from ..methods.base import Needs, Stage

PREFILL, QUESTION, DECODE = "prefill", "question", "decode"


@dataclass
class ForwardState:
    """Per-sample state seen by :func:`lcbench.engine.attention.lcbench_attention`.

    ``compressing`` marks the pass after which the cache stages run on each layer;
    ``protected`` is the number of trailing stored tokens a cache stage must keep (the
    question, in query-aware mode).
    """

    cache: KVCache
    stages: list[Stage]
    phase: str = PREFILL
    compressing: bool = False
    protected: int = 0
    needs: Needs = field(default_factory=Needs)
    timer: Any = None  # engine.timing.Stopwatch
    compress_seconds: float = 0.0
    probe: Any = None  # models.hook.HookProbe: records each attention call (the post-load check)
    # KV sharing (engine/kv_sharing.py): per layer type, what the layer whose keys and values later
    # layers reuse held when it attended in the current forward
    kv_sources: dict = field(default_factory=dict)

    def __post_init__(self):
        self.attention_stages = [s for s in self.stages if "prefill_attention" in s.stages]
        self.cache_stages = [s for s in self.stages if "cache" in s.stages]
        self.decode_stages = [s for s in self.stages if "decode" in s.stages]
