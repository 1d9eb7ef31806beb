"""KV-cache quantization: cache-stage components that store keys/values in fewer bits
(:class:`~lcbench.cache.quantized.QuantizedLayer`, packed, dequantized on use)."""
