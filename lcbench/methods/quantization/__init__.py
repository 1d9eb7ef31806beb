"""KV-cache quantization: cache-stage components that store keys/values in fewer bits."""

BUILTIN: dict[str, str] = {}
