"""The whole-model cache: a transformers ``Cache`` whose layers are lcbench :class:`KVLayer` s.

transformers' attention modules call :meth:`KVCache.update` with the new keys/values of a layer;
the engine sets the true positions (and padding validity) of those tokens beforehand with
:meth:`KVCache.set_incoming`, so that after tokens are dropped later tokens keep their true
positions (DESIGN.md) and layers may hold different numbers of tokens.

A hybrid model's linear-attention / state-space layers keep a fixed-size state through
transformers' ``get_conv_state`` / ``update_conv_state`` / ``get_recurrent_state`` /
``update_recurrent_state``: the first such call on a still-empty layer makes it a
:class:`~lcbench.cache.recurrent.RecurrentLayer` (the model, not a list kept by hand, says which
layers they are). A layer that runs attention and a state-space mixer side by side (Falcon-H1,
Zamba's hybrid layers) keeps its KV layer in ``layers`` and its state beside it in
:attr:`KVCache.side_states` (a recurrent layer that then receives keys moves there). A state is not
key/value payload: :meth:`KVCache.nbytes` and :meth:`KVCache.kept_tokens` cover the token layers,
:meth:`KVCache.state_nbytes` the states.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import Cache

from ..errors import UserError
from .layer import DenseLayer, KVLayer, caches_nothing
from .recurrent import RecurrentLayer


class KVCache(Cache):
    def __init__(self, num_layers: int, layer_factory: Callable[[int], KVLayer] | None = None):
        factory = layer_factory or (lambda i: DenseLayer())
        # Cache's own __init__, not the next class in the MRO: a subclass that is also a model's own
        # cache type (cache/model_caches.py) must not run that type's constructor
        Cache.__init__(self, layers=[factory(i) for i in range(num_layers)])
        self.incoming_positions: torch.Tensor | None = None
        self.incoming_valid: torch.Tensor | None = None
        self.forward_id = 0
        self.side_states: dict[int, RecurrentLayer] = {}  # the states of layers that also hold KV

    @classmethod
    def over(cls, layers: list) -> "KVCache":
        """A cache of this class over existing ``layers`` (no copies, no side states)."""
        out = cls.__new__(cls)
        Cache.__init__(out, layers=list(layers))
        out.incoming_positions = None
        out.incoming_valid = None
        return out

    # --- what transformers calls ----------------------------------------------------------
    def set_incoming(self, positions: torch.Tensor, valid: torch.Tensor | None = None, prompt: bool = True) -> None:
        """True positions (B, q) and validity (B, q) of the tokens of the next forward pass;
        ``prompt``: they are prompt tokens, not a generated one (a recurrent layer remembers the
        state a prompt part leaves: cache/recurrent.py)."""
        self.incoming_positions = positions
        self.incoming_prompt = prompt
        self.incoming_valid = None if valid is None or bool(valid.all()) else valid
        self.forward_id = getattr(self, "forward_id", 0) + 1
        if self.states():
            self._refuse_padding()

    def _refuse_padding(self) -> None:
        if getattr(self, "incoming_valid", None) is not None:
            raise RuntimeError("padded rows reached a hybrid model's recurrent layers, whose state would take the "
                               "padding in: the engine runs such models one unpadded row at a time")

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.incoming_positions is None:
            raise RuntimeError("KVCache.set_incoming must be called before a forward pass")
        self.updated_layer = layer_idx  # read by attention when its module is shared by layers (Zamba2)
        layer = self.layers[layer_idx]
        if isinstance(layer, RecurrentLayer):  # a layer with attention beside its mixer: the state moves aside
            self.side_states_of()[layer_idx] = layer
            layer = self.layers[layer_idx] = DenseLayer()
        layer.append(key_states, value_states, self.incoming_positions.to(key_states.device),
                     None if self.incoming_valid is None else self.incoming_valid.to(key_states.device))
        if getattr(layer, "lazy_dense", False):  # rows sharing a context: attention reads the layer itself
            return key_states, value_states
        return layer.dense()

    # --- a hybrid model's linear-attention / state-space layers (cache/recurrent.py) -------------
    def recurrent_layer(self, layer_idx: int, state_idx: int = 0) -> RecurrentLayer:
        """Layer ``layer_idx`` as a recurrent layer (a still-empty layer becomes one), told that the
        model touches its state in the current forward."""
        self._refuse_padding()
        side = self.side_states_of()
        layer = side.get(layer_idx, self.layers[layer_idx])
        if not isinstance(layer, RecurrentLayer):
            if not isinstance(layer, KVLayer):
                raise UserError(f"layer {layer_idx} of this model asks for a recurrent state while lcbench's cache "
                                f"holds a {type(layer).__name__} there. Fix: use a supported architecture (README).")
            layer = RecurrentLayer()
            if layer_idx < len(self.layers) and caches_nothing(self.layers[layer_idx]):
                self.layers[layer_idx] = layer  # a still-empty layer: recurrent (it moves aside if keys come)
            else:
                side[layer_idx] = layer  # the layer already stores keys: its state goes beside them
        positions = self.incoming_positions
        nxt = layer.tokens if positions is None else int(positions.amax()) + 1
        layer.touch(getattr(self, "forward_id", 0), getattr(self, "incoming_prompt", True), nxt, state_idx)
        return layer

    def holds_state(self) -> bool:
        """True once a recurrent layer has taken tokens in (a forward now continues its state)."""
        return any(layer.tokens for layer in self.states())

    def side_states_of(self) -> dict[int, RecurrentLayer]:
        """:attr:`side_states` (created on caches built without ``__init__``)."""
        if not hasattr(self, "side_states"):
            self.side_states = {}
        return self.side_states

    def states(self) -> list[RecurrentLayer]:
        """Every recurrent state the cache holds: recurrent layers and the states beside KV layers."""
        return [layer for layer in self.layers if isinstance(layer, RecurrentLayer)] + \
            list(self.side_states_of().values())

    # transformers' state methods (cache_utils.Cache), on the layer's own state or the one beside its KV
    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        layer = self.recurrent_layer(layer_idx, state_idx)
        return layer.conv_states[state_idx] if layer.has_previous_state[state_idx] else None

    def update_conv_state(self, conv_states, layer_idx: int, state_idx: int = 0, **kwargs):
        return self.recurrent_layer(layer_idx, state_idx).update_conv_state(conv_states, state_idx, **kwargs)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        layer = self.recurrent_layer(layer_idx, state_idx)
        return layer.recurrent_states[state_idx] if layer.has_previous_state[state_idx] else None

    def update_recurrent_state(self, recurrent_states, layer_idx: int, state_idx: int = 0, **kwargs):
        return self.recurrent_layer(layer_idx, state_idx).update_recurrent_state(recurrent_states, state_idx, **kwargs)

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        if layer_idx is None:
            states = self.states()
            return bool(states) and all(all(s.has_previous_state.values()) for s in states[-1:])
        if layer_idx >= len(self.layers):
            return False
        layer = self.recurrent_layer(layer_idx, state_idx or 0)
        flags = layer.has_previous_state
        return all(flags.values()) if state_idx is None else flags[state_idx]

    def increase_count(self, layer_idx: int, state_idx: int = 0) -> None:
        """transformers ≥ 5.25: a model whose short convolution updated its state in place counts the
        token on the layer holding that state, which may be a side state beside the layer's KV
        (Falcon-H1, Zamba2), where transformers' own lookup (``self.layers[layer_idx]``) finds the KV."""
        self.recurrent_layer(layer_idx, state_idx).increase_count(state_idx)

    def is_recording_past(self, layer_idx: int) -> bool:
        return False  # lcbench keeps its own mark of the last prompt part (RecurrentLayer.crop_to)

    def token_layers(self) -> list[KVLayer]:
        """The layers holding tokens: not the recurrent ones, nor those nothing was stored in
        (a layer without a token mixer: Nemotron-H's MLP layers)."""
        return [layer for layer in self.layers if not isinstance(layer, RecurrentLayer) and not caches_nothing(layer)]

    def state_nbytes(self) -> int:
        """Bytes of the recurrent layers' fixed-size states (0 on a model without them)."""
        return sum(layer.state_nbytes() for layer in self.states())

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens the layer has seen: the true position its next token takes. That is transformers'
        meaning (a sliding layer counts what it forgot), and Llama-4's attention reads it as its
        queries' positions (the temperature of its NoPE layers): a compressed layer stores fewer slots
        (``seq_len``), which would shift that position."""
        return self.layers[layer_idx].next_position()

    # --- measurement ----------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of keys/values stored over all layers, measured from the tensors held."""
        return sum(layer.nbytes() for layer in self.layers)

    def kept_tokens(self) -> float:
        """Mean number of valid tokens held per layer, row and KV head."""
        counts = [layer.kept_tokens().float().mean().item() for layer in self.token_layers()]
        return sum(counts) / len(counts) if counts else 0.0

    # --- sharing a context between turns --------------------------------------------------
    def crop_to(self, length_per_layer: list[int]) -> None:
        for i, (layer, n) in enumerate(zip(self.layers, length_per_layer)):
            side = self.side_states_of().get(i)
            if side is not None:  # the tokens cut from the layer's KV are the state's latest ones
                side.crop_to(side.tokens - (layer.seq_len() - n))
            layer.crop_to(n)

    def seq_lengths(self) -> list[int]:
        return [layer.seq_len() for layer in self.layers]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (1-D long, ascending) in every layer (finished rows leave)."""
        self.layers[:] = [layer.keep_rows(rows) for layer in self.layers]
        self.side_states = {i: state.keep_rows(rows) for i, state in self.side_states_of().items()}

    def share_rows(self, n: int) -> "KVCache":
        """A new cache of ``n`` rows continuing this one-row cache, each layer shared where its
        kind allows (:mod:`lcbench.cache.shared`: no copy of the context) and copied otherwise;
        this cache is kept and never changed through the new one."""
        from .shared import share_rows

        return self._like([share_rows(layer, n) for layer in self.layers], n)

    def repeat_rows(self, n: int) -> "KVCache":
        """A new cache whose rows are this cache's rows repeated ``n`` times (copies; this one is kept)."""
        return self._like([layer.repeat_rows(n) for layer in self.layers], n)

    def _like(self, layers: list, n: int) -> "KVCache":
        """A new cache of ``layers``, with this cache's side states repeated ``n`` times."""
        out = type(self).over(layers)
        out.side_states = {i: state.repeat_rows(n) for i, state in self.side_states_of().items()}
        return out
