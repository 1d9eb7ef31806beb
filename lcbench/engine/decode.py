"""Greedy decoding on an lcbench cache, for a batch of rows that may end at different times."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from .carried import carrying
from .end_cache import EndCache, row_end_cache
from .state import DECODE, ForwardState


def forward(model, ids: torch.Tensor | None, positions: torch.Tensor, state: ForwardState,
            valid: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
            all_logits: bool = False) -> torch.Tensor:
    """One forward pass of ``ids`` (B, q) — or of ``inputs_embeds`` (B, q, hidden) in their place —
    at true ``positions`` through lcbench's attention; returns the logits of the last position (B, V),
    or with ``all_logits`` those of every position (B, q, V: teacher forcing, :mod:`.loglik`).

    On a hybrid model whose recurrent layers do not continue a state exactly over several tokens
    (transformers' PyTorch Mamba paths of Jamba and Bamba; the probe measures it:
    :attr:`~lcbench.models.hook.Geometry.stepwise`), a pass continuing a state feeds its tokens one
    at a time, as ``model.generate``'s decoding steps would."""
    width = (ids if ids is not None else inputs_embeds).shape[1]
    geometry = getattr(model, "lcbench_geometry", None)
    if width > 1 and geometry is not None and geometry.stepwise and state.cache.holds_state():
        steps = [forward(model, None if ids is None else ids[:, j:j + 1], positions[:, j:j + 1], state,
                         None if valid is None else valid[:, j:j + 1],
                         None if inputs_embeds is None else inputs_embeds[:, j:j + 1], all_logits)
                 for j in range(width)]
        return torch.cat(steps, dim=1) if all_logits else steps[-1]
    state.cache.set_incoming(positions, valid, prompt=state.phase != DECODE)
    inputs = {"input_ids": ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    with carrying(state=state):
        out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=0 if all_logits else 1,
                    **{_cache_kwarg(model): state.cache})
    return out.logits if all_logits else out.logits[:, -1, :]


@functools.lru_cache(maxsize=None)
def _cache_kwarg_for(cls) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` in model forwards."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _cache_kwarg(model) -> str:
    return _cache_kwarg_for(type(model))


@dataclass
class RowOutput:
    tokens: list[int]
    text: str
    stopped_by: str  # "eos", "stop", "length"
    end: EndCache | None = None  # the row's cache when its decoding ended (engine/end_cache.py)


def greedy_decode(model, tokenizer, state: ForwardState, first_logits: torch.Tensor,
                  next_positions: torch.Tensor, max_new_tokens: list[int], eos_ids: set[int],
                  stops: list[tuple[str, ...]], min_new_tokens: list[int] | None = None,
                  stop_ids: list[tuple[int, ...]] | None = None, free_finished: bool = True) -> list[RowOutput]:
    """Decode greedily from ``first_logits`` (B, V); row ``i`` stops at an EOS id, one of
    ``stops[i]`` (cut from the text), one of ``stop_ids[i]`` (kept in the text, like an extra
    ``eos_token_id`` of ``model.generate``), or after ``max_new_tokens[i]`` tokens; before
    ``min_new_tokens[i]`` tokens EOS and ``stop_ids[i]`` are masked (``generate``'s ``min_length``).

    A row that stops leaves the batch: its rows of the cache are dropped
    (:meth:`lcbench.cache.KVCache.keep_rows`) and later steps run on the rows still decoding, so
    ``N`` rows cost about the sum of their tokens, not ``N`` × the longest (issue #14).
    ``free_finished=False`` keeps them in the batch to the end (the former behaviour, for tests)."""
    rows = first_logits.shape[0]
    min_new_tokens = min_new_tokens or [0] * rows
    stop_ids = stop_ids or [()] * rows
    state.phase = DECODE
    tokens: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    why = ["length"] * rows
    cut: list[str | None] = [None] * rows
    logits = first_logits
    positions = next_positions.clone()
    active = list(range(rows))  # the original row of each batch row still decoding
    ends: list[EndCache | None] = [None] * rows
    while True:
        early = [j for j, i in enumerate(active) if not done[i] and len(tokens[i]) < min_new_tokens[i]]
        if early:
            logits = logits.clone()
            for j in early:
                logits[j, sorted(eos_ids | set(stop_ids[active[j]]))] = float("-inf")
        nxt = logits.argmax(-1)
        for j, i in enumerate(active):
            if done[i]:  # only with free_finished=False
                continue
            t = int(nxt[j])
            if t in eos_ids:
                done[i], why[i] = True, "eos"
                continue
            tokens[i].append(t)
            if t in stop_ids[i]:
                done[i], why[i] = True, "stop"
                continue
            if stops[i]:
                text = tokenizer.decode(tokens[i], skip_special_tokens=True)
                hit = [text.index(s) for s in stops[i] if s in text]
                if hit:
                    done[i], why[i], cut[i] = True, "stop", text[: min(hit)]
                    continue
            if len(tokens[i]) >= max_new_tokens[i]:
                done[i] = True
        keep = [j for j, i in enumerate(active) if not done[i]]
        for j, i in enumerate(active):
            if done[i] and ends[i] is None:
                ends[i] = row_end_cache(state.cache, j, len(active))
        if not keep:
            break
        if free_finished and len(keep) < len(active):
            index = torch.tensor(keep, device=nxt.device)
            state.cache.keep_rows(index)  # each layer takes the index to its own device (device_map)
            nxt, positions = nxt.index_select(0, index), positions.index_select(0, index.to(positions.device))
            active = [active[j] for j in keep]
        logits = forward(model, nxt[:, None], positions[:, None], state)
        positions += 1
    out = []
    for i in range(rows):
        text = cut[i] if cut[i] is not None else tokenizer.decode(tokens[i], skip_special_tokens=True)
        out.append(RowOutput(tokens[i], text, why[i], ends[i]))
    return out
