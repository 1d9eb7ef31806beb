"""KV-cache dropping: cache-stage components that keep a subset of the context's tokens.

Each method scores the context slots of a layer right after that layer's prefill attention and
keeps the best ``(1 − ratio)`` share per KV head (:mod:`.select`). Each class declares its
family, paper and parameter defaults itself.
"""
