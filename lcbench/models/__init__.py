"""Model loading: any Hugging Face causal LM by name or path, the offline default, a tiny test model."""

from .loading import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
