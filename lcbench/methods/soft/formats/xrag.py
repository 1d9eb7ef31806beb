"""xRAG's projector (Cheng et al., xRAG: Extreme Context Compression for Retrieval-augmented
Generation with One Token, NeurIPS 2024, arXiv:2405.13792; official code
github.com/Hannibal046/xRAG, read at commit 121fa418, files ``src/model/xMistral/modeling_xmistral.py``,
``src/model/SFR/modeling_sfr.py``, ``src/eval/run_eval.py``, ``src/language_modeling/utils.py``).

Released format (``Hannibal046/xrag-7b``): an ``XMistralForCausalLM`` folder — the frozen
Mistral-7B-Instruct-v0.2 weights, a tokenizer with the added token ``<xRAG>``, and a projector
``projector.projector.{0,2,…}`` (``mlp{K}x_gelu``: Linear(retriever_hidden_size → hidden), then
GELU + Linear(hidden → hidden), K layers in all), named in ``config.json`` by ``projector_type``
and ``retriever_hidden_size``. A document becomes ONE token: the retriever
(``Salesforce/SFR-Embedding-Mistral``) embeds it (``last_token_pool`` of its last hidden state,
the document cut to 180 retriever tokens, not normalised) and the projector maps that to an input
embedding put where ``<xRAG>`` stands. The LLM is frozen, so the target (``--model``) is the
released folder (loaded as a plain Mistral) or its base.

lcbench's context is cut into near-equal passages, each one xRAG token (the paper's several
retrieved documents, one token each): as many passages as the ratio's budget holds, but none
longer than upstream's 180 tokens. The retriever reads the context ids as they are — the
released retriever and LLM share Mistral's tokenizer; one with a smaller vocabulary is refused.
The slots sit at positions n-m … n-1, directly before the question. Not reproduced: upstream's
prompt text around the token (``Background: <xRAG> …``); lcbench's own prompt follows the slots.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ....errors import UserError
from ..adapter import SoftContext
from .source import resolve
from .tensors import read_tensor

PASSAGE = 180  # run_eval.prepare_retrieval_embeds: max_length=180
RETRIEVER = "Salesforce/SFR-Embedding-Mistral"


def is_xrag_checkpoint(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    cfg = json.loads(config.read_text())
    return "projector_type" in cfg and cfg.get("retriever_hidden_size", 0) > 0


@dataclass
class XRAGCompressor:
    folder: Path
    projector: torch.nn.Sequential
    retriever_name: str
    _retriever: object = field(default=None, repr=False)

    @classmethod
    def from_pretrained(cls, folder: Path, retriever: str = "", **_) -> "XRAGCompressor":
        cfg = json.loads((Path(folder) / "config.json").read_text())
        depth = re.match(r"^mlp(\d+)x_gelu$", cfg["projector_type"])
        if depth is None:
            raise UserError(f"soft_compressor format=xrag: projector_type {cfg['projector_type']!r} is not mlpKx_gelu.")
        layers: list[torch.nn.Module] = []
        for i in range(int(depth.group(1))):
            w, b = (read_tensor(Path(folder), f"projector.projector.{2 * i}.{p}") for p in ("weight", "bias"))
            if w is None or b is None:
                raise UserError(f"soft_compressor format=xrag: {folder} lacks projector.projector.{2 * i}.weight/bias.")
            linear = torch.nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                linear.weight.copy_(w)
                linear.bias.copy_(b)
            layers += [torch.nn.GELU(), linear] if layers else [linear]
        return cls(Path(folder), torch.nn.Sequential(*layers).eval(), retriever or RETRIEVER)

    def retriever(self, device):
        """The retriever (``AutoModel``: its base model, last hidden states), loaded once."""
        if self._retriever is None:
            from transformers import AutoModel

            self._retriever = AutoModel.from_pretrained(str(resolve(self.retriever_name))).eval()
        return self._retriever.to(device)

    def compress(self, model, ids: torch.Tensor, ratio: float) -> SoftContext:
        embed = model.get_input_embeddings().weight
        if self.projector[-1].out_features != embed.shape[1]:
            raise UserError(f"soft_compressor format=xrag: the projector makes {self.projector[-1].out_features}-wide "
                            f"embeddings, the target's are {embed.shape[1]}. Fix: use xRAG's LLM as --model.")
        retriever = self.retriever(ids.device)
        if retriever.config.vocab_size <= int(ids.max()):
            raise UserError(f"soft_compressor format=xrag: the retriever {self.retriever_name} does not share the "
                            f"target's tokenizer (vocabulary {retriever.config.vocab_size}). Fix: pass retriever= one "
                            f"that does (the release: {RETRIEVER} with Mistral).")
        n = ids.shape[1]
        count = min(n, max(1, round(n * (1.0 - ratio)), math.ceil(n / PASSAGE)))
        slots = []
        with torch.no_grad():
            for i in range(count):
                passage = ids[:, i * n // count:(i + 1) * n // count]
                states = retriever(input_ids=passage).last_hidden_state  # last_token_pool, no padding
                slots.append(self.projector.to(states)(states[:, -1]))
        embeds = torch.stack(slots, 1).to(embed.dtype)
        return SoftContext(positions=torch.arange(n - count, n, device=ids.device)[None], embeds=embeds)
