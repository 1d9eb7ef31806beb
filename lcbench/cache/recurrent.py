"""The cache of a hybrid model's linear-attention or state-space layer: a fixed-size state, no keys.

Hybrid models (Qwen3-Next, Qwen3.5, Jamba, Nemotron-H, Kimi-Linear, OLMo-Hybrid, Bailing, ...)
interleave attention layers with gated-delta-rule, Mamba or short-convolution layers. In
transformers 5.24 such a layer keeps a convolution state and a recurrent state through
``Cache.get_conv_state`` / ``update_conv_state`` / ``get_recurrent_state`` /
``update_recurrent_state`` (transformers/cache_utils.py: ``LinearAttentionLayer``, which
:class:`RecurrentLayer` extends). It never calls attention, so no method acts on it: KV-cache
methods compress the attention layers only. :class:`~lcbench.cache.KVCache` turns a still-empty
layer into a :class:`RecurrentLayer` the first time the model asks for its state, so every cache
lcbench builds serves hybrids without knowing the model.

The state sums up every token seen, in order; it cannot forget one. Hence:

- it is never compressed, and its bytes are counted apart (:meth:`RecurrentLayer.state_nbytes`,
  recorded as ``state_bytes``), not in the KV bytes a compression ratio is measured on;
- it cannot be cut back to any length: :meth:`RecurrentLayer.crop_to` returns to the state after
  the last prompt part (a forward outside the decode phase, e.g. the question a multi-turn
  conversation goes on from, remembered when the next forward first touches the layer) and
  refuses any other length;
- a padded token would enter it (lcbench passes the model no padding mask, and a short
  convolution mixes neighbours anyway), so the engine runs a hybrid model one row at a time,
  never padded (:attr:`lcbench.engine.runner.Engine.one_row`), and :meth:`KVCache.set_incoming`
  refuses padding on a cache holding a state.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import LinearAttentionLayer

from .layer import tensor_bytes


class RecurrentLayer(LinearAttentionLayer):
    """transformers' linear-attention layer cache with what lcbench's engine asks of every layer."""

    positions = None  # no stored tokens: attention never reads this layer
    valid = None
    bias = None
    is_sliding = False
    lazy_dense = False

    def __init__(self) -> None:
        super().__init__(number_of_states=1)
        self.tokens = 0  # tokens the state has taken in: the true position the next one takes
        self.forward_id = -1  # the KVCache forward that last touched this layer
        self.last_prompt = False  # that forward fed prompt tokens (not a generated one)
        self.mark: tuple[int, dict, dict] | None = None  # (tokens, conv, recurrent) after the last prompt part

    # --- what KVCache calls around transformers' state methods -------------------------------
    def touch(self, forward_id: int, prompt: bool, next_position: int, state_idx: int) -> None:
        """The model is about to read or write this layer's state in forward ``forward_id`` (of
        prompt tokens or a generated one, the last at ``next_position - 1``): on its first touch in
        a new forward, remember the state a prompt forward left (before the model changes it in
        place), and count the tokens."""
        for states, empty in ((self.conv_states, None), (self.recurrent_states, None),
                              (self.is_conv_states_initialized, False), (self.is_recurrent_states_initialized, False),
                              (self.has_previous_state, False), (self.conv_kernel_size, None)):
            states.setdefault(state_idx, empty)  # models with several states per layer
        self.number_of_states = max(self.number_of_states, state_idx + 1)
        if forward_id == self.forward_id:
            return
        if self.last_prompt:
            self.mark = (self.tokens, _clone(self.conv_states), _clone(self.recurrent_states))
        self.forward_id, self.last_prompt, self.tokens = forward_id, prompt, next_position

    def state_nbytes(self) -> int:
        """Bytes of the convolution and recurrent states held (all rows)."""
        return tensor_bytes(*self.conv_states.values(), *self.recurrent_states.values())

    # --- the layer interface the engine uses on every layer ------------------------------------
    def nbytes(self) -> int:
        """0: no key/value payload (the state is counted by :meth:`state_nbytes`)."""
        return 0

    def seq_len(self) -> int:
        return self.tokens

    def next_position(self) -> int:
        return self.tokens

    def get_seq_length(self) -> int:
        return self.tokens

    def crop_to(self, length: int) -> None:
        """Go back to ``length`` tokens: nothing to do at the current length; the remembered state
        after the last prompt part at its length; refused anywhere else (a state cannot forget)."""
        if length == self.tokens:
            return
        if self.mark is None or self.mark[0] != length:
            at = "no earlier prompt part" if self.mark is None else f"the state after {self.mark[0]} tokens"
            raise RuntimeError(f"a recurrent (linear-attention) layer cannot go back from {self.tokens} to {length} "
                               f"tokens: it holds a running state and {at}")
        self.tokens, conv, recurrent = self.mark[0], self.mark[1], self.mark[2]
        self.conv_states, self.recurrent_states = _clone(conv), _clone(recurrent)
        self.forward_id, self.last_prompt = -1, False

    def keep_rows(self, rows: torch.Tensor) -> "RecurrentLayer":
        return self._rows(lambda t: t.index_select(0, rows.to(t.device)))

    def repeat_rows(self, n: int) -> "RecurrentLayer":
        return self._rows(lambda t: t.repeat_interleave(n, dim=0))

    def _rows(self, fn) -> "RecurrentLayer":
        """A copy with every state (and the remembered one) mapped by ``fn`` along the batch."""
        out = RecurrentLayer.__new__(RecurrentLayer)
        out.__dict__.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()})
        out.conv_states, out.recurrent_states = _map(self.conv_states, fn), _map(self.recurrent_states, fn)
        if self.mark is not None:
            out.mark = (self.mark[0], _map(self.mark[1], fn), _map(self.mark[2], fn))
        return out


def _map(states: dict, fn) -> dict:
    return {i: None if t is None else fn(t) for i, t in states.items()}


def _clone(states: dict) -> dict:
    return _map(states, torch.clone)
