"""KV-cache dropping: cache-stage components that keep a subset of the context's tokens.

Each method scores the context slots of a layer right after that layer's prefill attention and
keeps the best ``(1 − ratio)`` share per KV head (:mod:`.select`); presets (paper, defaults)
are in ``methods/kv_dropping.toml``.
"""

BUILTIN = {
    "random": "lcbench.methods.dropping.random:RandomDrop",
    "streamingllm": "lcbench.methods.dropping.streamingllm:StreamingLLM",
    "h2o": "lcbench.methods.dropping.h2o:H2O",
    "snapkv": "lcbench.methods.dropping.snapkv:SnapKV",
    "pyramidkv": "lcbench.methods.dropping.pyramidkv:PyramidKV",
    "adakv": "lcbench.methods.dropping.adakv:AdaKV",
    "tova": "lcbench.methods.dropping.tova:TOVA",
    "knorm": "lcbench.methods.dropping.knorm:KNorm",
    "chunkkv": "lcbench.methods.dropping.chunkkv:ChunkKV",
    "expected_attention": "lcbench.methods.dropping.expected_attention:ExpectedAttention",
    "leverage": "lcbench.methods.dropping.leverage:Leverage",
    "compactor": "lcbench.methods.dropping.leverage:Compactor",
    "qfilters": "lcbench.methods.dropping.qfilters:QFilters",
}
