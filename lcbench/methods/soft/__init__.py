"""Soft compression: continuous representations (merged KV, pooled embeddings) in place of tokens."""
