"""The KV cache lcbench holds: per layer, per KV head, the stored keys/values, their true
positions and validity, and the bytes they occupy (measured from the tensors held)."""

from .layer import DenseLayer, KVLayer
from .kvcache import KVCache

__all__ = ["DenseLayer", "KVLayer", "KVCache"]
