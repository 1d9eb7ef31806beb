"""Gist tokens (Mu, Li & Goodman, Learning to Compress Prompts with Gist Tokens, NeurIPS 2023,
arXiv:2304.08467; official code github.com/jayelm/gisting, read at commit 3be0d062, files
``src/compress.py``, ``src/gist_caching.py``, ``src/gist_llama.py``, ``src/weight_diff.py``).

Released format: a full causal LM fine-tuned with gist masking, saved by ``save_pretrained``
(config + weights), with a tokenizer whose vocabulary has one added special token ``<GIST>``
(``additional_special_tokens``; the embedding matrix grew by one row). Compression
(``get_gist_activations``): run the prompt followed by k ``<GIST>`` tokens through the model with
a plain causal mask and keep only the gist positions' past key/values; the continuation then
attends to those k slots alone, its positions continuing after the gist tokens
(``gist_offset``). The gist model is both compressor and target, so the target lcbench runs
(``--model``) must be this very checkpoint.

lcbench keeps the question at its true position (the context's length n); to give the question
the same relative distances to the gist slots as in training (gist tokens directly before it),
the compression pass runs at positions shifted by -k (RoPE is relative, so this is the upstream
computation moved k places), and the gist slots sit at positions n-k … n-1. The number of gist
tokens is what the model was trained with (the released models: 1, named ``*-gist-1``); the
requested ratio does not change it (a fixed-rate compressor).

The released LLaMA-7B checkpoints (``jayelm/llama-7b-gist-1``) are weight *diffs* against LLaMA-7B
(``weight_diff.py``); they must be recovered first. A diff's final norm weights are near zero,
which is how this loader recognises one and says so.

Not reproduced: upstream wraps the prompt as ``Instruction: …\n<GIST>`` and the continuation as
``\nInput: …\nOutput:``; lcbench appends the gist tokens to its own rendered context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ....errors import UserError
from ..adapter import SoftContext
from .tensors import read_tensor

GIST_TOKEN = "<GIST>"


def gist_token_id(tokenizer) -> int | None:
    """The id of ``<GIST>`` when the tokenizer has it as an added token, else None."""
    return tokenizer.get_added_vocab().get(GIST_TOKEN)


def is_gist_checkpoint(folder: Path) -> bool:
    """A transformers model folder whose tokenizer files declare ``<GIST>``."""
    if not (folder / "config.json").is_file():
        return False
    return any(GIST_TOKEN in p.read_text(errors="ignore") for p in folder.glob("*.json")
               if p.name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"))


@dataclass
class GistCompressor:
    folder: Path
    gist_id: int
    tokens: int
    gist_row: torch.Tensor | None  # the checkpoint's <GIST> embedding, to recognise the target model
    norm: torch.Tensor | None  # the checkpoint's final norm weights (a weight diff's are ~0)

    @classmethod
    def from_pretrained(cls, folder: Path, gist_tokens: int = 0, **_) -> "GistCompressor":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        gist_id = gist_token_id(tok)
        if gist_id is None:
            raise UserError(f"soft_compressor format=gist: the tokenizer in {folder} has no {GIST_TOKEN} token. "
                            f"Fix: point path= at a gist model (e.g. a recovered jayelm/llama-7b-gist-1).")
        named = re.search(r"gist-(\d+)", str(folder))
        tokens = gist_tokens or (int(named.group(1)) if named else 1)
        embed = read_tensor(folder, "model.embed_tokens.weight")
        norm = read_tensor(folder, "model.norm.weight")
        if norm is not None and float(norm.float().abs().mean()) < 0.05:
            raise UserError(f"soft_compressor format=gist: {folder} looks like a weight diff (its final norm weights "
                            f"are ~0), as the released jayelm/llama-7b-gist-* are. Fix: recover the model with gisting's "
                            f"src/weight_diff.py recover --path_raw <llama-7b> --path_diff {folder}, then pass the "
                            f"recovered folder as both --model and path=.")
        row = embed[gist_id].clone() if embed is not None and gist_id < embed.shape[0] else None
        return cls(Path(folder), gist_id, tokens, row, norm.clone() if norm is not None else None)

    def check_target(self, model) -> None:
        """Gisting's compressor is the target model: refuse any other model."""
        emb = model.get_input_embeddings().weight
        params = dict(model.named_parameters())
        same = emb.shape[0] > self.gist_id
        if same and self.gist_row is not None:
            same = torch.allclose(emb[self.gist_id].float().cpu(), self.gist_row.float(), atol=1e-2, rtol=1e-2)
        norm = params.get("model.norm.weight")
        if same and self.norm is not None and norm is not None:
            same = norm.shape == self.norm.shape and torch.allclose(norm.float().cpu(), self.norm.float(), atol=1e-2, rtol=1e-2)
        if not same:
            raise UserError(f"soft_compressor format=gist: the target model is not the gist model in {self.folder} "
                            f"(gisting compresses with the target model itself). Fix: pass the same checkpoint as "
                            f"--model and path=.")

    def compress(self, model, ids: torch.Tensor, ratio: float) -> SoftContext:
        self.check_target(model)
        from transformers import DynamicCache

        n, k = ids.shape[1], self.tokens
        gist = torch.full((1, k), self.gist_id, dtype=ids.dtype, device=ids.device)
        positions = torch.arange(n + k, device=ids.device)[None] - k
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=torch.cat([ids, gist], 1), position_ids=positions, cache=cache, use_cache=True)
        kv = [(layer.keys[:, :, n:].clone(), layer.values[:, :, n:].clone()) for layer in cache.layers]
        return SoftContext(positions=positions[:, n:], kv=kv)
