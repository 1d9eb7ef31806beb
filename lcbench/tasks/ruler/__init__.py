"""RULER (NVIDIA/RULER@c3f5e3b): 13 synthetic tasks generated offline at any context length."""
