"""KV-cache dropping: cache-stage components that keep a subset of the context's tokens."""

BUILTIN = {
    "random": "lcbench.methods.dropping.random:RandomDrop",
    "streamingllm": "lcbench.methods.dropping.streamingllm:StreamingLLM",
    "snapkv": "lcbench.methods.dropping.snapkv:SnapKV",
}
