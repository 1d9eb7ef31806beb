"""KV-cache dropping: cache-stage components that keep a subset of the context's tokens."""
