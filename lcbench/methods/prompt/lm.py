"""The small causal LM a prompt compressor scores tokens with (LLMLingua, LongLLMLingua, Selective
Context), and incremental conditioning on it.

``compressor=target`` (the default) uses the model being evaluated, handed to the text stage by the
engine (``TextInput.model``); outside the engine it falls back to lcbench's offline default model.
Any other value is a registered model name (``lcbench ls models``) or anything ``from_pretrained``
accepts (a hub id or a local folder). Loaded compressors are cached per process.

Surprisal is ``−log p(token | everything before it)`` in nats. Long inputs are scored through a
KV cache in chunks; when the conditioning text outgrows ``window`` tokens the state restarts from
its most recent half (LLMLingua conditions on a bounded window the same way). On a hybrid model
(linear-attention / state-space layers: Qwen3-Next, Jamba, ...) the cache is built from the model's
config, so those layers keep their recurrent state, and scoring without committing runs on a copy
of the cache: a recurrent state cannot be cropped back.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import Cache

from ...cache.model_caches import transformers_cache
from ...errors import UserError
from ...models.hook import keeps_state
from ..base import TextInput

_LOADED: dict[str, "CompressorLM"] = {}
CHUNK = 256  # tokens per forward (bounds the logits held at once)


@dataclass
class CompressorLM:
    model: Any
    tokenizer: Any
    name: str
    window: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (no special tokens) and their character offsets."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def session(self, prefix: Sequence[int] = ()) -> "Session":
        return Session(self, prefix)

    def surprisal(self, ids: Sequence[int], prefix: Sequence[int] = ()) -> torch.Tensor:
        """Surprisal of every token of ``ids`` given ``prefix`` and the tokens before it."""
        session = self.session(prefix)
        out = [session.commit(ids[k: k + CHUNK]) for k in range(0, len(ids), CHUNK)]
        return torch.cat(out) if out else torch.zeros(0)

    def generate(self, prompt: str, max_tokens: int, stop: str | None = None) -> str:
        """The greedy continuation of ``prompt`` (at most ``max_tokens`` tokens, ending before EOS
        or before the first ``stop``), as text (AttentionRAG's hint, Perception's guiding questions)."""
        ids, _ = self.encode(prompt)
        session = self.session(ids[:-1])
        out: list[int] = []
        last = ids[-1:]
        for _ in range(max_tokens):
            session.commit(last)
            token = int(session.next_logp.argmax())
            if token == self.tokenizer.eos_token_id:
                break
            out.append(token)
            if stop is not None and stop in self.tokenizer.decode(out):
                break
            last = [token]
        text = self.tokenizer.decode(out)
        return text.split(stop)[0] if stop is not None else text


class Session:
    """A conditioning state that grows: :meth:`score` asks how surprising some tokens would be
    next, :meth:`commit` appends tokens (returning their surprisal)."""

    def __init__(self, lm: CompressorLM, prefix: Sequence[int] = ()):
        self.lm = lm
        self.ids: list[int] = []
        self.cache: Cache | None = None
        self.next_logp: torch.Tensor | None = None  # log-probs of the token after the state
        bos = lm.tokenizer.bos_token_id
        self._run(([bos] if bos is not None else []) + list(prefix), commit=True)

    def score(self, ids: Sequence[int]) -> torch.Tensor:
        """Surprisal of ``ids`` as a continuation, without changing the state."""
        return self._run(list(ids), commit=False)

    def commit(self, ids: Sequence[int]) -> torch.Tensor:
        return self._run(list(ids), commit=True)

    def _restart(self, room: int) -> None:
        """Keep only the most recent tokens so ``room`` more fit in the window."""
        keep = self.ids[-max(0, min(self.lm.window // 2, self.lm.window - room)):] if self.ids else []
        bos = self.lm.tokenizer.bos_token_id
        self.ids, self.cache, self.next_logp = [], None, None
        self._run(([bos] if bos is not None else []) + keep, commit=True)

    @torch.inference_mode()
    def _run(self, ids: list[int], commit: bool) -> torch.Tensor:
        if not ids:
            return torch.zeros(0)
        if len(self.ids) + len(ids) > self.lm.window:
            if len(ids) > self.lm.window // 2:
                raise ValueError("score at most window/2 tokens at once")
            self._restart(len(ids))
        start_len = len(self.ids)
        first = float("inf") if self.next_logp is None else float(-self.next_logp[ids[0]])
        out = [torch.tensor([first])]
        recurrent = keeps_state(self.lm.model.config)
        if self.cache is None:
            cache = transformers_cache(self.lm.model)
        else:  # a recurrent state cannot be cropped: score on a copy
            cache = copy.deepcopy(self.cache) if recurrent and not commit else self.cache
        last = None
        for k in range(0, len(ids), CHUNK):
            piece = ids[k: k + CHUNK]
            x = torch.tensor([piece], device=self.lm.device)
            pos = torch.arange(start_len + k, start_len + k + len(piece), device=self.lm.device)[None]
            logits = self.lm.model(input_ids=x, position_ids=pos, cache=cache, use_cache=True).logits[0].float()
            logp = logits.log_softmax(-1)
            targets = torch.tensor(ids[k + 1: k + len(piece) + 1], device=logp.device)
            out.append(-logp[: len(targets)].gather(1, targets[:, None])[:, 0].cpu())
            last = logp[-1]
        if commit:
            self.cache, self.ids, self.next_logp = cache, self.ids + ids, last
        elif not recurrent:
            cache.crop(-len(ids))
            self.cache = cache if self.ids else None
        return torch.cat(out)


def load_compressor(spec: str, text: TextInput, window: int) -> CompressorLM:
    """The compressor LM named by ``spec`` (see the module doc)."""
    if spec == "target" and text.model is not None:
        return CompressorLM(text.model, text.tokenizer, "target", _window(text.model, window))
    key = spec if spec != "target" else "default"
    if key not in _LOADED:
        _LOADED[key] = _load(spec)
    lm = _LOADED[key]
    return CompressorLM(lm.model, lm.tokenizer, lm.name, _window(lm.model, window))


def _load(spec: str) -> CompressorLM:
    from ...models.loading import DEFAULT_MODEL, MODELS, load_pretrained, resolve_device

    name = DEFAULT_MODEL if spec == "target" else spec
    device = resolve_device(None)
    try:
        loaded = MODELS.get(name)({"dtype": "auto"}, device) if name in MODELS else load_pretrained(name, {}, device)
    except UserError as exc:
        raise UserError(f"prompt compressor LM: {exc} (it is the method's `compressor` parameter; "
                        f"`compressor=target` uses the evaluated model)") from None
    return CompressorLM(loaded.model, loaded.tokenizer, name, 0)


def _window(model, window: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or window
    return max(2 * CHUNK, min(window, int(limit)))
