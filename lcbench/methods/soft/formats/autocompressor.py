"""AutoCompressor summary vectors (Chevalier, Wettig, Ajith & Chen, Adapting Language Models to
Compress Contexts, EMNLP 2023, arXiv:2305.14788; official code github.com/princeton-nlp/AutoCompressors,
read at commit 80352a42, files ``auto_compressor.py`` (``AutoCompressorMixin.forward_segment``,
``forward``), ``run/eval_llama.sh``).

Released format (``princeton-nlp/AutoCompressor-Llama-2-7b-6k``): a ``LlamaAutoCompressorModel``
folder — the fine-tuned Llama weights plus ``embed_summary.weight`` (summary_length, hidden), and
``summary_length`` (50) / ``accumulate_summary`` (true) in ``config.json``. Compression: the
context is cut into segments; segment i runs as input embeddings ``[summary vectors so far,
segment i, the summary_length summary-token embeddings]`` at positions 0… (Llama's positions
simply continue over the three parts), and the last hidden states (after the final norm) at the
summary tokens are segment i's summary vectors, appended to the soft prompt (``accumulate_summary``)
or replacing it. The model reads the final soft prompt as input embeddings before the question;
compressor and target are the same fine-tuned model, so ``--model`` must be this checkpoint (it
loads as a plain LlamaForCausalLM; ``embed_summary`` is only read here).

Segments: with accumulation, as many segments as the ratio's budget holds summary vectors for
(at least one), none longer than upstream's evaluation segments (2048 tokens); without it, the
2048-token segments of upstream and one final set of summary vectors. The summary vectors sit at
positions n-s … n-1 before the question, the question following them as upstream's does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ....errors import UserError
from ..adapter import SoftContext
from .tensors import read_tensor, same_weights

SEGMENT = 2048  # run/eval_llama.sh: segment_lengths "2048 2048"


def is_autocompressor_checkpoint(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("summary_length", 0) > 0


@dataclass
class AutoCompressor:
    folder: Path
    summary: torch.Tensor  # embed_summary.weight (summary_length, hidden)
    accumulate: bool

    @classmethod
    def from_pretrained(cls, folder: Path, **_) -> "AutoCompressor":
        cfg = json.loads((Path(folder) / "config.json").read_text())
        summary = read_tensor(Path(folder), "embed_summary.weight")
        if summary is None:
            raise UserError(f"soft_compressor format=autocompressor: {folder} has no embed_summary.weight. Fix: point "
                            f"path= at an AutoCompressor checkpoint (e.g. princeton-nlp/AutoCompressor-Llama-2-7b-6k).")
        return cls(Path(folder), summary, bool(cfg.get("accumulate_summary", False)))

    def segments(self, n: int, ratio: float) -> list[tuple[int, int]]:
        count = math.ceil(n / SEGMENT)
        if self.accumulate:
            count = max(count, round(n * (1.0 - ratio)) // self.summary.shape[0], 1)
        count = min(count, n)
        return [(i * n // count, (i + 1) * n // count) for i in range(count)]

    def compress(self, model, ids: torch.Tensor, ratio: float) -> SoftContext:
        if not all(same_weights(model, self.folder, name) for name in ("model.norm.weight", "model.embed_tokens.weight")):
            raise UserError(f"soft_compressor format=autocompressor: the target model is not the AutoCompressor in "
                            f"{self.folder} (it compresses with itself). Fix: pass the same checkpoint as --model and path=.")
        embed = model.get_input_embeddings()
        summary = self.summary.to(embed.weight)[None]
        soft = summary[:, :0]
        n = ids.shape[1]
        with torch.no_grad():
            for start, end in self.segments(n, ratio):
                x = torch.cat([soft, embed(ids[:, start:end]), summary], 1)
                new = model(inputs_embeds=x, output_hidden_states=True, use_cache=False).hidden_states[-1][:, -summary.shape[1]:]
                soft = torch.cat([soft, new], 1) if self.accumulate else new
        s = soft.shape[1]
        if s > n:
            raise UserError(f"soft_compressor format=autocompressor: {s} summary vectors for a {n}-token context would "
                            f"grow it. Fix: use longer contexts.")
        return SoftContext(positions=torch.arange(n - s, n, device=ids.device)[None], embeds=soft)
