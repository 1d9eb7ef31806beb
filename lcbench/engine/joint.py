"""Several runs' rows decoded in one batch (issue #14: runs that share a prefill decode together).

Runs that share a prefill (:mod:`.shared_prefill`) differ only in their cache and decode stages:
after each compressed its own copy of a context, their rows prefill their question parts together
(one forward pass for all runs asking the same questions) and are greedy-decoded together — one
forward pass per step for all of them, so the model's weights are read once per step instead of
once per run — while each row keeps everything its run would have alone. A :class:`JointLayer` holds, per layer, each run's own layer (dense, quantized, evicting,
ragged, shared between turns: any kind) for its rows: appends go to each run's layer, attention runs
per run on its own layer with its own stages (:func:`lcbench.engine.attention.attend_layer`: its
sparse decode, its eviction after the step), a finished row leaves its run's layer exactly as it
would leave a run decoding alone. Only the projections and MLPs see the whole batch. So each row's
tokens, KV bytes at the end and kept tokens are those of its run alone (the records are compared in
``tests/test_joint_decode.py`` and ``benchmarks/sweep.py``); its ``question_prefill_s`` and
``decode_s`` are the joint passes' times and ``batch_rows`` says how many rows shared them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..cache.layer import KVLayer
from ..methods.base import Needs
from .row_stack import pad_left
from .state import DECODE, QUESTION, ForwardState


@dataclass
class JointPart:
    """One run's rows of a joint batch: its own layer and the state its stages run with."""

    layer: KVLayer
    rows: int
    state: ForwardState


class JointLayer(KVLayer):
    """One layer of a joint batch: ``parts`` in row order, each one run's own layer for its rows."""

    def __init__(self, parts: list[JointPart], latent: bool = False):
        super().__init__()
        self.parts = parts
        self.latent = latent
        # KVCache.update hands attention the new tokens; attention goes through attend(). On a latent
        # cache (multi-head latent attention) the model must expand what the parts hold, so update
        # hands it every part's slots left-padded to the longest (:meth:`dense`) and attend() cuts
        # each part's out.
        self.lazy_dense = not latent
        self.positions = None
        self.valid = None
        self.is_initialized = True

    def _spans(self):
        start = 0
        for part in self.parts:
            yield part, start, start + part.rows
            start += part.rows

    # --- what decoding uses --------------------------------------------------------------------
    def append(self, keys, values, positions, valid):
        for part, a, b in self._spans():
            part.layer.append(keys[a:b], values[a:b], positions[a:b], None if valid is None else valid[a:b])

    def attend(self, query: torch.Tensor, attend_layer: Callable, key: torch.Tensor | None = None,
               value: torch.Tensor | None = None) -> torch.Tensor:
        """Each run's rows attend over its own layer with its own stages; outputs in row order.
        ``key``/``value``: what the model expanded from :meth:`dense` (latent caches only)."""
        outs = []
        for part, a, b in self._spans():
            if self.latent:  # the part's slots are the last of the padded width
                n = part.layer.seq_len()
                k, v = key[a:b, :, key.shape[2] - n:], value[a:b, :, value.shape[2] - n:]
            else:
                lazy = getattr(part.layer, "lazy_dense", False)
                k, v = (None, None) if lazy else part.layer.dense()
            out, part.layer = attend_layer(query[a:b], k, v, part.layer, part.state)
            outs.append(out)
        return torch.cat(outs)

    def keep_rows(self, rows):
        """The rows ``rows`` of the batch: each run's layer keeps its own (untouched when it keeps
        all of them, as a run alone would not cut it), a run with none left leaves."""
        wanted = rows.tolist()
        parts = []
        for part, a, b in self._spans():
            local = [r - a for r in wanted if a <= r < b]
            if not local:
                continue
            layer = part.layer if len(local) == part.rows else part.layer.keep_rows(
                torch.tensor(local, dtype=torch.long, device=rows.device))
            parts.append(JointPart(layer, len(local), part.state))
        return JointLayer(parts, self.latent)

    def part_of(self, row: int) -> tuple[KVLayer, int, int]:
        """(the run's layer, the row's index in it, the run's rows) for batch row ``row``."""
        for part, a, b in self._spans():
            if a <= row < b:
                return part.layer, row - a, part.rows
        raise IndexError(row)

    def seq_len(self) -> int:
        return max(part.layer.seq_len() for part in self.parts)

    def next_position(self) -> int:
        return max(part.layer.next_position() for part in self.parts)

    def kept_tokens(self) -> torch.Tensor:
        return torch.cat([part.layer.kept_tokens() for part in self.parts])

    def nbytes(self) -> int:
        return sum(part.layer.nbytes() for part in self.parts)

    # --- not used while decoding ------------------------------------------------------------------
    def dense(self):
        """Every part's slots, left-padded to the longest and stacked by rows: what a latent cache's
        model expands (padding is cut off again in :meth:`attend`, never attended)."""
        if not self.latent:
            raise RuntimeError("a joint layer has no single dense view: attention goes through JointLayer.attend")
        views = [part.layer.dense() for part in self.parts]
        width = max(k.shape[2] for k, _ in views)
        return (torch.cat([pad_left(k, width - k.shape[2], 0.0) for k, _ in views]),
                torch.cat([pad_left(v, width - v.shape[2], 0.0) for _, v in views]))

    def select(self, index):
        raise RuntimeError("a joint layer is only decoded: compression runs on each run's own layer")

    def crop_to(self, length):
        raise RuntimeError("a joint layer is only decoded: multi-turn runs decode alone")

    def repeat_rows(self, n):
        raise RuntimeError("a joint layer is built from each run's decode rows, never repeated")


def joint_state(states: list[ForwardState], rows: list[int], timer, phase: str = DECODE,
                latent: bool = False) -> ForwardState:
    """The forward state of one batch over ``states`` (each run's cache, with ``rows`` rows each):
    a cache of :class:`JointLayer` s, no stages of its own (each part's run the parts' own); every
    part's state is switched to ``phase`` (decoding, or prefilling question parts)."""
    for state in states:
        state.phase = phase
    layers = [JointLayer([JointPart(state.cache.layers[i], n, state) for state, n in zip(states, rows)], latent)
              for i in range(len(states[0].cache.layers))]
    cache = type(states[0].cache).over(layers)
    return ForwardState(cache=cache, stages=[], needs=Needs(), timer=timer)


def ask_together(pendings: list) -> None:
    """Prefill the question parts of every pending turn of ``pendings`` (each run's compressed
    cache, :meth:`~lcbench.engine.runner.Engine.ask`), setting each one's ``asked``. Runs whose
    rows are the same questions at the same position — every run of a shared group, unless resumed
    at different turns — go in one batch (one forward pass, their left padding as each would pad
    alone); each run's layers then hold what its own question prefill leaves. Each run's
    ``question_prefill_s`` is the batch's."""
    groups: dict[tuple, list] = {}
    for pd in pendings:
        key = (tuple(map(tuple, pd.question_rows())), len(pd.prepared.prompt.context_ids))
        groups.setdefault(key, []).append(pd)
    for group in groups.values():
        start = len(group[0].prepared.prompt.context_ids)
        if len(group) == 1:
            pd = group[0]
            pd.asked = pd.engine.question_prefill(pd.cache, pd.question_rows(), start)
            continue
        lead = group[0].engine
        states = [pd.engine.forward_state(pd.cache) for pd in group]
        rows = [len(pd.prepared.todo) for pd in group]
        joint = joint_state(states, rows, lead.clock, phase=QUESTION, latent=lead.latent)
        asked = lead.prefill_questions(joint, [q for pd in group for q in pd.question_rows()], start)
        for i, layer in enumerate(joint.cache.layers):  # each run's own layers, as its attention left them
            for part in layer.parts:
                part.state.cache.layers[i] = part.layer
        begin = 0
        for pd, state, n in zip(group, states, rows):
            pd.asked = replace(asked, state=state, logits=asked.logits[begin:begin + n],
                               next_positions=asked.next_positions[begin:begin + n])
            begin += n


def decode_together(pendings: list) -> list[list]:
    """Prefill the question parts of every pending turn of ``pendings``
    (:class:`~lcbench.engine.runner.Pending`, one per run, all on one model: :func:`ask_together`)
    and greedy-decode them all in one batch; returns each run's records, in order."""
    ask_together(pendings)
    lead = pendings[0].engine
    rows = [len(pd.prepared.todo) for pd in pendings]
    state = joint_state([pd.asked.state for pd in pendings], rows, lead.clock, latent=lead.latent)
    logits = torch.cat([pd.asked.logits for pd in pendings])
    next_positions = torch.cat([pd.asked.next_positions for pd in pendings])
    turns = [pd.prepared.sample.turns[k] for pd in pendings for k in pd.prepared.todo]
    times: dict[str, float] = {}
    with torch.inference_mode(), lead.clock.region(times, "decode_s"):
        outputs = lead._greedy(state, logits, next_positions, turns)
    records, start = [], 0
    for pd, n in zip(pendings, rows):
        records.append(pd.engine.answer(pd, outputs[start:start + n], times["decode_s"], len(turns)))
        start += n
    return records
