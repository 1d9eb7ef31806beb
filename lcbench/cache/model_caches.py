"""lcbench's cache as the cache type a model insists on.

Some models check the cache they are handed against a class of their own and refuse any other:
MiniMax (MiniMax-Text-01, MiniMax-M1) raises unless ``isinstance(cache, MiniMaxCache)``
(transformers ``MiniMaxModel.forward``), and its lightning-attention layers keep their running
``K^T V`` state through ``MiniMaxCache.get_linear_cache`` / ``set_linear_cache``. For such a model
the engine builds :class:`MiniMaxKVCache`: a :class:`KVCache` in every behaviour (its methods come
first in the MRO; the few that ``MiniMaxCache`` and ``DynamicCache`` define are pointed back at
lcbench's), an instance of the model's class for the check, whose linear cache is the state of an
lcbench :class:`~lcbench.cache.recurrent.RecurrentLayer` — so a hybrid's rules (no padding, one row
per turn, back to the state the last question left) hold for it as for Qwen3-Next or Jamba.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from transformers.cache_utils import Cache

from .kvcache import KVCache


def cache_class(model) -> type[KVCache]:
    """The cache class the engine builds for ``model``: :class:`KVCache`, or the subclass that is
    also the model's own cache type (built on first use: importing a model's code at import time
    would cost every CLI command the seconds of loading transformers' modeling code)."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    build = _MODEL_CACHES.get(getattr(text, "model_type", ""))
    return build() if build is not None else KVCache


def cache_for(model, num_layers: int) -> KVCache:
    """A new, empty cache of ``num_layers`` layers, of the class ``model`` accepts."""
    return cache_class(model)(num_layers)


def transformers_cache(model):
    """A new transformers cache for a pass of ``model``'s own attention (a prompt compressor's
    scoring LM): the model's own cache type where it insists on one, else a ``DynamicCache`` (built
    from the config when some layers keep a recurrent state, so it holds their states)."""
    from transformers.cache_utils import DynamicCache

    from ..models.hook import keeps_state

    own = cache_class(model)
    if own is not KVCache:
        return next(c for c in own.__mro__ if c.__module__.startswith("transformers.models."))()
    return DynamicCache(config=model.config) if keeps_state(model.config) else DynamicCache()


@functools.cache
def minimax_cache() -> type[KVCache]:
    """The class below, made once (importing MiniMax's modeling code when first needed)."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    class MiniMaxKVCache(KVCache, MiniMaxCache):
        """:class:`KVCache` that MiniMax accepts; its linear cache is a recurrent layer's state."""

        # what MiniMaxCache (and DynamicCache) define would otherwise shadow Cache's behind KVCache
        __len__ = Cache.__len__
        batch_repeat_interleave = Cache.batch_repeat_interleave
        batch_select_indices = Cache.batch_select_indices
        crop = Cache.crop
        is_croppable = Cache.is_croppable

        def __iter__(self):
            raise TypeError("lcbench's cache is not a legacy tuple cache")

        def get_linear_cache(self, layer_idx: int) -> torch.Tensor | None:
            """The layer's running state, or None before its first pass (MiniMax then runs its
            block-wise prefill from a zero state)."""
            layer = self.recurrent_layer(layer_idx)
            return layer.recurrent_states[0] if layer.is_recurrent_states_initialized[0] else None

        def set_linear_cache(self, layer_idx: int, linear_cache: torch.Tensor) -> None:
            layer = self.recurrent_layer(layer_idx)
            layer.update_recurrent_state(linear_cache, 0)
            layer.has_previous_state[0] = True

    return MiniMaxKVCache


# model_type -> the cache class its model accepts (built on first use)
_MODEL_CACHES: dict[str, Callable[[], type[KVCache]]] = {"minimax": minimax_cache}
