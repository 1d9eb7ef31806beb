"""Sparse attention: prefill/decode attention that computes only selected blocks."""
