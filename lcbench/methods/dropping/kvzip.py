"""KVzip: score each KV pair by how much the model needs it to reconstruct the context.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (arXiv:2505.23416);
official code snu-mllab/KVzip@5d84729 (``model/wrapper.py`` ``self_task``/``scoring``,
``attention/score.py`` ``KVScore._get_score``), and kvpress 0.5.5 ``KVzipPress``, which lcbench follows.

What runs per sample, in :meth:`KVzip.context_inputs` (its time counts as compression time):

1. The context is prefilled into a scratch cache through lcbench's attention.
2. The context is cut into chunks of ``chunk_size`` tokens. For each chunk the model is run, on that
   cache, over a *reconstruction prompt*: ``"\\n\\nRepeat the previous context exactly."`` (later chunks:
   ``"\\n\\nRepeat the part of the previous context exactly, starting with"`` and the previous chunk's last
   8 tokens), the chat template's assistant suffix (``"\\n"`` without a template), then the chunk itself —
   at the positions after the context. When the context starts with the chat template's text before
   the user's content (as lcbench's tasks build prompts), those tokens are not reconstructed (score 0,
   as kvpress; the official code instead never evicts its system prompt). In each layer every reconstruction query attends to the first
   ``n_sink`` context keys (at most the chunk's start), the chunk's keys and the prompt's own keys
   (causally), a softmax over those keys only; a context KV pair's score is the largest such weight over
   the queries and the query heads of its KV head. The prompt's KV is then dropped again.
3. The first ``n_sink`` tokens get the highest score. The requested share of all context KV pairs, over
   every layer and KV head together (``layerwise=false``, the paper's and kvpress's default), or of each
   layer (``layerwise=true``), is evicted lowest score first; heads and layers thus keep different
   numbers of tokens (ragged layers, bytes fall with the kept tokens).

The engine then prefills the sample as usual, and :meth:`KVzip.compress_layer` keeps, per layer, the
context KV pairs those scores kept (query-aware mode: the question tail is kept too and counted in the
ratio). lcbench therefore computes the context's KV twice (the scoring pass and the engine's prefill):
one context prefill more than kvpress or the official code, on top of the reconstruction passes (about
the context's length again); the extra prefill is counted as compression time too.

Differences from the official code: its default ``chunk_size`` is 2000 and its later-chunk prompt ends
with a space; its sinks are the system prompt's tokens (kvpress: the first ``n_sink``). kvpress's
``kvzip_plus_normalization`` (KVzip+) is not implemented. The scores of a layer that slides a window
(Gemma-2/3, Mistral) are those of the tokens it still holds. Parity: on a fixed input the native method
keeps kvpress ``KVzipPress``'s exact positions (tests/test_kvpress_natives_more.py). ``--budget`` is
refused (the budgets differ per head and layer by design).
"""

from __future__ import annotations

import torch

from ...cache.model_caches import cache_for
from ...chat import chat_text
from ...cache.ragged import RaggedLayer
from ...errors import UserError
from ...params import Param
from ..base import LayerObservation, Needs, Stage, keep_count
from .select import context_slots

FIRST = "\n\nRepeat the previous context exactly."
LATER = "\n\nRepeat the part of the previous context exactly, starting with"
POSTFIX = 8  # tokens of the previous chunk that start a later chunk's prompt (kvpress, official)


def template_parts(tokenizer) -> tuple[str, str]:
    """The chat template's text before a user turn's content and between it and the assistant's answer
    (``("", "\n")`` without a template), found as kvpress finds them: around a marker content."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "", "\n"
    content, mark = "dummy context", "\n" + "#" * len("dummy context")
    text = chat_text(tokenizer, [{"role": "user", "content": content + mark}])
    before, suffix = text.split(mark)
    return before.split(content)[0], suffix


class _Reconstruction:
    """The reconstruction pass's only cache stage (called as one by the engine's attention; not a
    registered method): score the chunk's context slots, then drop the prompt's KV again."""

    stages = ("cache",)
    budget_tokens = None
    needs = Needs(queries=True)

    def __init__(self, scores: torch.Tensor, n_sink: int):
        self.scores, self.n_sink = scores, n_sink  # (layers, H_kv, context) by true position
        self.start = self.end = 0

    def compress_layer(self, layer, seen: LayerObservation):
        q = seen.queries  # (1, Hq, r, D), post-rotary
        r = q.shape[2]
        keys, _ = layer.dense()  # (1, H, n + r, D)
        positions = layer.positions[0, 0, :-r]
        sinks = positions < min(self.n_sink, self.start)
        chunk = (positions >= self.start) & (positions < self.end)
        held = keys[0, :, :-r]
        subset = torch.cat([held[:, sinks], held[:, chunk], keys[0, :, -r:]], dim=1)  # (H, s + c + r, D)
        h = subset.shape[0]
        queries = q[0].reshape(h, -1, r, q.shape[-1])  # (H, groups, r, D)
        scaling = getattr(seen.module, "scaling", q.shape[-1] ** -0.5)
        logits = torch.einsum("hgrd,hkd->hgrk", queries.float(), subset.float()) * scaling
        own = torch.ones((r, r), dtype=torch.bool, device=logits.device).tril()
        logits[..., -r:] = logits[..., -r:].masked_fill(~own, float("-inf"))
        attn = logits.softmax(-1)
        s, c = int(sinks.sum()), int(chunk.sum())
        score = attn[..., s: s + c].amax(dim=(1, 2))  # (H, c): max over the group and the queries
        self.scores[seen.layer_idx][:, positions[chunk]] = score.to(self.scores.dtype)
        layer.crop_to(layer.seq_len() - r)
        return layer


class KVzip(Stage):
    name = "kvzip"
    hybrid_layers = False  # its reconstruction scores are a (num_hidden_layers, heads, L) table filled from every layer's keys
    family = "kv_dropping"
    paper = ("Kim et al., KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction, NeurIPS 2025 "
             "(arXiv:2505.23416)")
    summary = ("an extra pass asks the model to repeat the context; each KV pair is scored by its largest attention "
               "from those reconstruction queries, the lowest evicted over all layers and heads")
    params = (
        Param("n_sink", int, 4, "initial tokens never evicted (highest score)", min=0),
        Param("chunk_size", int, 2048, "context tokens reconstructed per pass (kvpress; official: 2000)", min=1),
        Param("layerwise", bool, False, "evict the ratio in every layer (true) instead of over all layers together"),
    )
    calibration_params = ()
    token_budget = False

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self.begin_sample()

    def begin_sample(self) -> None:
        self._scores: torch.Tensor | None = None  # (layers, H_kv, context) by true position
        self._evict: list[int] | None = None  # KV pairs each layer evicts

    def calibrate(self, model, tokenizer):
        """The reconstruction prompts' token ids in the model's tokenizer."""
        encode = lambda text: list(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
        prefix, suffix = template_parts(tokenizer)
        return {"first": encode(FIRST), "later": encode(LATER), "suffix": encode(suffix), "prefix": encode(prefix)}

    def _prompts(self) -> dict:
        if self.calibration is None:
            raise UserError("kvzip has no tokenized reconstruction prompt. Fix: run it through lcbench's engine, "
                            "which calibrates it once per model, or set stage.calibration = stage.calibrate(model, "
                            "tokenizer).")
        return self.calibration

    def prefix_length(self, context: torch.Tensor) -> int:
        """Leading context tokens that are the chat template's text before the user's content (kvpress does
        not reconstruct them: they score 0, the sinks aside); 0 when the context does not start with them."""
        prefix = self._prompts()["prefix"]
        return len(prefix) if prefix and context[0, : len(prefix)].tolist() == prefix else 0

    def reconstruction_inputs(self, context: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """(start, end, prompt ids) of each chunk of ``context`` (1, L) after the template prefix, at true
        positions: the reconstruction prompt, the template's suffix, then the chunk."""
        prompts, size, length = self._prompts(), self.args["chunk_size"], context.shape[1]
        out = []
        first = self.prefix_length(context)
        for start in range(first, length, size):
            end = min(length, start + size)
            lead = (prompts["first"] if start == first
                    else prompts["later"] + context[0, max(first, start - POSTFIX): start].tolist())
            ids = torch.tensor([lead + prompts["suffix"]], dtype=context.dtype, device=context.device)
            out.append((start, end, torch.cat([ids, context[:, start:end]], dim=1)))
        return out

    @torch.inference_mode()
    def score(self, model, context: torch.Tensor, layers: int) -> torch.Tensor:
        """(layers, H_kv, L) KVzip scores of the context's KV pairs (sinks highest; +inf where a
        sliding-window layer no longer holds the token after the prefill, so it is never counted)."""
        from ...engine.decode import forward  # the engine imports methods: import it when it runs
        from ...engine.state import PREFILL, ForwardState
        from ...engine.timing import Stopwatch

        length, device = context.shape[1], context.device
        state = ForwardState(cache=cache_for(model, layers), stages=[], timer=Stopwatch([device]))
        state.phase = PREFILL
        forward(model, context, torch.arange(length, device=device)[None], state)
        held = torch.zeros((layers, length), dtype=torch.bool, device=device)
        for i, layer in enumerate(state.cache.layers):
            held[i, layer.positions[0, 0]] = True
        heads = model.config.num_key_value_heads
        scorer = _Reconstruction(torch.zeros((layers, heads, length), device=device), self.args["n_sink"])
        state = ForwardState(cache=state.cache, stages=[scorer], needs=scorer.needs, timer=state.timer)
        state.phase, state.compressing = PREFILL, True
        for start, end, ids in self.reconstruction_inputs(context):
            scorer.start, scorer.end = start, end
            state.protected = ids.shape[1]
            forward(model, ids, torch.arange(length, length + ids.shape[1], device=device)[None], state)
        scores = scorer.scores
        scores[..., : self.args["n_sink"]] = scores.amax() + 1.0
        return scores.masked_fill(~held[:, None, :], float("inf"))

    def context_inputs(self, model, ids, context_length, cache):
        self.begin_sample()
        if self.ratio <= 0 or context_length <= 1:
            return None
        if ids.shape[0] != 1:
            raise UserError("kvzip scores one sample's context at a time. Fix: run it without --batch-size.")
        scores = self.score(model, ids[:, :context_length], len(cache.layers))
        n_layers, heads, length = scores.shape
        question = ids.shape[1] - context_length  # the question tail (query-aware) counts in the ratio
        held = torch.isfinite(scores[:, 0]).sum(-1).tolist()  # context tokens each layer holds
        per_layer = [min(heads * n, heads * (n + question - keep_count(n + question, self.ratio))) for n in held]
        if self.args["layerwise"]:
            self._evict = per_layer
        else:
            lowest = (-scores.reshape(-1)).topk(sum(per_layer)).indices
            self._evict = torch.bincount(lowest // (heads * length), minlength=n_layers).tolist()
        self._scores = scores
        return None  # the engine prefills the sample itself; compress_layer keeps what the scores kept

    def compress_layer(self, layer, seen: LayerObservation):
        if self.ratio <= 0:
            return layer
        if self._scores is None:
            raise UserError("kvzip scores the context in its own passes before the prefill (context_inputs); it "
                            "cannot compress a cache prefilled without them (e.g. a shared prefill). Fix: run it "
                            "as the chain's first component, without prefill sharing.")
        n = context_slots(layer, seen)
        evict = min(self._evict[seen.layer_idx], layer.positions.shape[1] * n)
        if evict <= 0 or n <= 1:
            return layer
        scores = self._scores[seen.layer_idx].to(layer.positions.device)
        by_slot = scores.gather(1, layer.positions[0, :, :n].clamp(max=scores.shape[-1] - 1))  # (H, n)
        if layer.valid is not None:
            by_slot = by_slot.masked_fill(~layer.valid[0, :, :n], float("inf"))
        keep = torch.ones_like(by_slot, dtype=torch.bool)
        keep.view(-1)[(-by_slot.reshape(-1)).topk(evict).indices] = False
        tail = torch.ones((keep.shape[0], seen.protected), dtype=torch.bool, device=keep.device)
        return RaggedLayer.from_layer(layer, torch.cat([keep, tail], dim=-1)[None])
