"""Attention of a compressor LM over a text, read out in one forward (DSPC's attention
contribution, AttentionRAG's focus token).

SDPA returns no attention weights and eager attention returns every layer's full matrix; this
module instead registers its own attention function with transformers' ``AttentionInterface``: it
computes each layer's output exactly as lcbench's attention does outside the engine
(:func:`lcbench.engine.attention.lcbench_attention` without a state: softcap, sinks and sliding
windows honoured) and, from the layer's post-rotary queries and keys, accumulates only what was
asked — per key, the attention it received summed over every query (in bounded chunks,
:func:`~lcbench.engine.attention.attention_sum`), and the attention of the last query (the focus
token) over every key — averaged over query heads and layers. The readout itself is the plain
softmax of the scaled logits under the causal mask (a softcap or a sliding window, which no
text-stage method here assumes, is not applied to it). The model's attention implementation is
switched for the duration of the forward and restored after it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ...engine.attention import attention_sum, grouped_scores, lcbench_attention, registered, softmax_in_place
from ...engine.carried import carried, carrying
from .lm import CompressorLM

PROBE_NAME = "lcbench_text_attention"


@dataclass
class Readout:
    """What :func:`probe_attention` collects over the layers of one forward."""

    received: bool = False  # per key: attention summed over the queries that see it
    focus: bool = False  # the last query's attention over every key
    layers: int = 0
    received_sum: torch.Tensor | None = None  # (L,) summed over layers, mean over heads
    focus_sum: torch.Tensor | None = None  # (L,)
    extra: dict = field(default_factory=dict)
    # per-head readout (EHPC): the attention of the last ``window`` queries of each query head over
    # every key, for the layers listed (layer → (Hq, window, L)); the forward stops after layer
    # ``depth − 1`` (a partial-depth forward: the later layers never run)
    window: int = 0
    head_layers: frozenset = frozenset()
    depth: int | None = None
    head_probs: dict = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        current = getattr(self, name)
        setattr(self, name, value if current is None else current + value)


class StopForward(Exception):
    """Raised after the last layer a partial-depth readout needs (caught by :func:`head_attention`)."""


def probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered attention function: lcbench's plain attention, plus the readout."""
    readout: Readout | None = carried("readout")
    out = lcbench_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if readout is not None:
        groups = getattr(module, "num_key_value_groups", 1)
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        L = key.shape[2]
        with torch.no_grad():
            if readout.received:
                readout.add("received_sum", attention_sum(query, key, groups, scale, L)[0].mean(0))
            if readout.focus:
                scores = grouped_scores(query[:, :, -1:], key, groups, scale)  # last query sees every key
                readout.add("focus_sum", softmax_in_place(scores)[0].reshape(-1, L).mean(0))
            layer = getattr(module, "layer_idx", readout.layers)
            if readout.window and layer in readout.head_layers:
                w = min(readout.window, query.shape[2])
                scores = grouped_scores(query[:, :, -w:], key, groups, scale)  # (1, Hkv, G·w, L)
                causal = torch.arange(L, device=key.device)[None, :] <= torch.arange(L - w, L, device=key.device)[:, None]
                scores = scores.view(1, -1, groups, w, L).masked_fill(~causal, float("-inf")).view(1, -1, groups * w, L)
                readout.head_probs[layer] = softmax_in_place(scores)[0].reshape(-1, w, L).cpu()  # (Hq, w, L)
        readout.layers += 1
        if readout.depth is not None and readout.layers >= readout.depth:
            raise StopForward
    return out


@contextlib.contextmanager
def probing(model):
    """Route ``model``'s attention through :func:`probe_attention`, restoring it afterwards."""
    before = model.config._attn_implementation
    model.set_attn_implementation(registered(PROBE_NAME, probe_attention))
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@dataclass
class AttentionPass:
    """One forward's readout over ``ids``: ``received`` (L,) the mean attention each token received
    from the queries that see it (itself and every later one), ``focus`` (L,) the last token's
    attention, ``surprisal`` (L,) ``−log p`` of each token given the ones before (``inf`` for an
    unconditioned first token); all averaged over heads and layers, BOS (if any) left out."""

    received: torch.Tensor | None
    focus: torch.Tensor | None
    surprisal: torch.Tensor


@torch.inference_mode()
def head_attention(lm: CompressorLM, ids: Sequence[int], layers: Sequence[int], window: int) -> dict[int, torch.Tensor]:
    """Per query head, the attention of the last ``window`` tokens of ``ids`` over every token, in
    each of ``layers`` (layer → (Hq, window, len(ids))) — from a forward through the first
    ``max(layers) + 1`` layers only (EHPC's partial-depth pass; no BOS is prepended)."""
    x = torch.tensor([list(ids)], device=lm.device)
    readout = Readout(window=window, head_layers=frozenset(layers), depth=max(layers) + 1)
    with probing(lm.model), carrying(readout=readout), contextlib.suppress(StopForward):  # raised after the last needed layer
        lm.model(input_ids=x, use_cache=False)
    return readout.head_probs


@torch.inference_mode()
def attention_pass(lm: CompressorLM, ids: Sequence[int], received: bool = False, focus: bool = False) -> AttentionPass:
    """Run ``lm`` once over ``ids`` (BOS prepended when the tokenizer has one) and read out."""
    bos = lm.tokenizer.bos_token_id
    lead = [bos] if bos is not None else []
    x = torch.tensor([lead + list(ids)], device=lm.device)
    readout = Readout(received=received, focus=focus)
    with probing(lm.model), carrying(readout=readout):
        logits = lm.model(input_ids=x, use_cache=False).logits[0].float()
    skip = len(lead)
    logp = logits.log_softmax(-1)
    targets = x[0, 1:]
    shifted = -logp[:-1].gather(1, targets[:, None])[:, 0].cpu()
    surprisal = torch.cat([torch.tensor([float("inf")]), shifted])[skip:]
    layers = max(1, readout.layers)
    out_received = out_focus = None
    if received and readout.received_sum is not None:
        total = readout.received_sum.cpu() / layers
        seen_by = torch.arange(x.shape[1], 0, -1, dtype=torch.float32)  # queries at or after each key
        out_received = (total / seen_by)[skip:]
    if focus and readout.focus_sum is not None:
        out_focus = (readout.focus_sum.cpu() / layers)[skip:]
    return AttentionPass(out_received, out_focus, surprisal)
