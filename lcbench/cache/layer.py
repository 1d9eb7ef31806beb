"""One attention layer's cache.

A layer stores, per batch row and KV head, a sequence of keys/values in *storage order*: context
tokens first (possibly a subset, after a method dropped some), then tokens appended later
(question, answer), always in arrival order. ``positions`` holds each stored token's true
position (the rotary phase already baked into its key) and ``valid`` marks padding or ragged
slots that attention must ignore. Subclasses change how keys/values are *stored* (quantized,
ragged per head) but always hand attention a dense ``(B, H, L, D)`` view through :meth:`dense`.

A :class:`DenseLayer` may also hold ``bias`` (B, H, L) float32: an additive attention logit per
stored slot (merge compensation: a slot standing for ``n`` merged tokens carries ``log n``, which is
exactly attention over that slot duplicated ``n`` times). It follows the slots through ``select``,
``crop_to``, ``keep_rows`` and ``repeat_rows``; appended tokens get 0. ``None`` (the default) is
no bias, and attention then takes its plain path unchanged. The bias is stored and counted in
:meth:`DenseLayer.nbytes` like quantization scales. Layer kinds that cannot hold one refuse a
biased layer (:func:`refuse_bias`).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from transformers.cache_utils import CacheLayerMixin

from ..errors import UserError
from .room import drop_room, grow


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by tensors' storage as laid out (numel × element size)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def refuse_bias(layer: "KVLayer", kind: str) -> None:
    """Raise a UserError when ``layer`` holds a per-slot attention bias that a ``kind`` layer,
    built from it, could not keep (the merged slots' compensation would be silently lost)."""
    if getattr(layer, "bias", None) is not None:
        raise UserError(
            f"a {kind} cannot hold the per-slot attention bias of merged slots (zeromerge's compensation), "
            f"so converting the merged layer would silently change attention. Fix: do not chain the merging method "
            f"with quantization, head-wise budgets or channel pruning (e.g. use snapkv+zeromerge, not "
            f"zeromerge+kivi, zeromerge+adakv or zeromerge+think); in multi-turn mode pass zeromerge's "
            f"decode_merge=false (forgetting an answer merged into other slots would leave heads ragged).")


class KVLayer(CacheLayerMixin):
    """What every lcbench cache layer provides to the attention function and to methods."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    positions: torch.Tensor | None  # (B, H, L) long: true position of each stored token
    valid: torch.Tensor | None  # (B, H, L) bool, or None when every slot is valid
    bias: torch.Tensor | None = None  # (B, H, L) float32 additive attention logit per slot (DenseLayer only)

    # --- storage contract -----------------------------------------------------------------
    @abstractmethod
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor | None) -> None:
        """Store new tokens (B, H, q, D) at the end; ``positions``/``valid`` are (B, q)."""

    @abstractmethod
    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as dense (B, H, L, D) tensors for attention (dequantized if stored packed)."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of the stored key/value payload (including quantization scales), measured from the
        tensors held. Bookkeeping (positions, validity) is not counted."""

    @abstractmethod
    def select(self, index: torch.Tensor) -> None:
        """Keep only the stored slots ``index`` (B, H, K), per row and head, in storage order."""

    @abstractmethod
    def crop_to(self, length: int) -> None:
        """Forget every slot at storage index ``>= length`` (undo appended tokens)."""

    @abstractmethod
    def repeat_rows(self, n: int) -> "KVLayer":
        """A new layer holding each batch row ``n`` times (turns that share a context)."""

    @abstractmethod
    def keep_rows(self, rows: torch.Tensor) -> "KVLayer":
        """The layer holding only batch rows ``rows`` (1-D long, ascending), in that order: how a
        decode lets finished rows go."""

    # --- derived --------------------------------------------------------------------------
    def seq_len(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def next_position(self) -> int:
        """The true position the next token takes: one past the latest stored one (0 when empty)."""
        positions = self.positions
        return 0 if positions is None or positions.numel() == 0 else int(positions.amax()) + 1

    def kept_tokens(self) -> torch.Tensor:
        """(B, H) number of valid stored tokens per row and head."""
        if self.positions is None:
            return torch.zeros(0)
        if self.valid is None:
            b, h, n = self.positions.shape
            return torch.full((b, h), n, dtype=torch.long)
        return self.valid.sum(-1)

    # --- transformers' CacheLayerMixin ----------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:  # storage is created in append
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("lcbench layers are updated through KVCache.update")

    def get_seq_length(self) -> int:
        return self.next_position()  # tokens seen, as KVCache.get_seq_length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_len() + query_length, 0

    def crop(self, max_length: int) -> None:
        self.crop_to(max_length if max_length >= 0 else self.seq_len() + max_length)


class DenseLayer(KVLayer):
    """Keys and values stored as they are, in the model's dtype. Per-head selection keeps the same
    number of tokens in every head, so storage stays rectangular and bytes fall with it."""

    def __init__(self):
        super().__init__()
        self.positions = None
        self.valid = None
        self.bias = None

    def append(self, keys, values, positions, valid):
        """New slots go into room kept after the held ones (:mod:`.room`): no copy of the layer per step."""
        b, h, q, _ = keys.shape
        pos = positions[:, None, :].expand(b, h, q)
        new_valid = None if valid is None else valid[:, None, :].expand(b, h, q)
        if self.keys is None:
            self.keys, self.values, self.positions = keys, values, pos.contiguous()
            self.valid = None if new_valid is None else new_valid.contiguous()
            self.is_initialized = True
            return
        if self.bias is not None:  # appended tokens stand for themselves: logit bias 0
            self._grow("bias", self.bias.new_zeros(b, h, q))
        if new_valid is not None or self.valid is not None:
            if self.valid is None:
                self.valid = torch.ones_like(self.positions, dtype=torch.bool)
            self._grow("valid", new_valid if new_valid is not None else torch.ones_like(pos, dtype=torch.bool))
        self._grow("keys", keys)
        self._grow("values", values)
        self._grow("positions", pos)

    def _grow(self, name: str, new: torch.Tensor) -> None:
        grow(self, name, new)

    def dense(self):
        return self.keys, self.values

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values, self.bias)

    def select(self, index):
        index, _ = index.sort(dim=-1)
        slots = index[..., None]  # keys and values may differ in width (MLA's latent and rotary key)
        self.keys = self.keys.gather(2, slots.expand(*index.shape, self.keys.shape[-1])).contiguous()
        self.values = self.values.gather(2, slots.expand(*index.shape, self.values.shape[-1])).contiguous()
        self.positions = self.positions.gather(2, index)
        if self.bias is not None:
            self.bias = self.bias.gather(2, index)
        if self.valid is not None:
            self.valid = self.valid.gather(2, index)
            if bool(self.valid.all()):
                self.valid = None

    def crop_to(self, length):
        if self.keys is None:  # a layer that caches nothing (KV sharing's reusing layers, an MLP-only layer)
            return
        self.drop_room()  # an older, longer view may still be held: never write over it
        self.keys = self.keys[:, :, :length]
        self.values = self.values[:, :, :length]
        self.positions = self.positions[:, :, :length]
        if self.valid is not None:
            self.valid = self.valid[:, :, :length]
        if self.bias is not None:
            self.bias = self.bias[:, :, :length]

    def drop_room(self) -> None:
        """Forget the room kept for appends (the next append copies into new storage)."""
        drop_room(self)

    def keep_rows(self, rows):
        if self.keys is None:
            return self
        rows = rows.to(self.positions.device)
        out = type(self).__new__(type(self))
        KVLayer.__init__(out)
        out.__dict__.update(self.__dict__)
        out.drop_room()
        for name in ("keys", "values", "positions", "valid", "bias"):
            t = getattr(self, name)
            setattr(out, name, None if t is None else t.index_select(0, rows))
        if out.valid is not None and bool(out.valid.all()):
            out.valid = None
        return out

    def repeat_rows(self, n):
        out = type(self).__new__(type(self))
        KVLayer.__init__(out)
        out.__dict__.update({k: v for k, v in self.__dict__.items()})
        out.drop_room()
        for name in ("keys", "values", "positions", "valid", "bias"):
            t = getattr(self, name)
            setattr(out, name, None if t is None else t.repeat_interleave(n, dim=0))
        return out


def caches_nothing(layer: KVLayer) -> bool:
    """A plain layer no token was ever stored in: one whose attention reuses another layer's keys and
    values (KV sharing: engine/kv_sharing.py), one without a token mixer (Nemotron-H's MLP layers),
    or one not written yet."""
    return type(layer) is DenseLayer and layer.positions is None


def lowest_visible(positions: torch.Tensor, window: int | None, chunk: int | None = None) -> torch.Tensor | None:
    """The lowest key position queries at true ``positions`` see: ``p − window + 1`` through a
    sliding window, the start of their chunk ``⌊p / chunk⌋ · chunk`` on a chunked layer; None when
    every earlier key is seen."""
    if window:
        return positions - window + 1
    if chunk:
        return torch.div(positions, chunk, rounding_mode="floor") * chunk
    return None
