"""The engine: one sample → text stage → prefill → cache stage → per-turn decode, timed."""
