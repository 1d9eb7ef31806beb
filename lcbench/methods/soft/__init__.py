"""Soft compression: continuous representations (merged KV, pooled embeddings) in place of tokens."""

BUILTIN: dict[str, str] = {
    "kvmerge": "lcbench.methods.soft.kvmerge:KVMerge",
    "pool": "lcbench.methods.soft.pool:Pool",
    "soft_compressor": "lcbench.methods.soft.adapter:SoftCompressorStage",
}
