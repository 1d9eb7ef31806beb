"""KV-cache quantization: cache-stage components that store keys/values in fewer bits
(:class:`~lcbench.cache.quantized.QuantizedLayer`, packed, dequantized on use). Presets in
``methods/kv_quantization.toml``."""

BUILTIN: dict[str, str] = {
    "kivi": "lcbench.methods.quantization.kivi:KIVI",
    "int8": "lcbench.methods.quantization.per_token:Int8",
    "int4": "lcbench.methods.quantization.per_token:Int4",
}
