"""ICAE memory slots (Ge et al., In-context Autoencoder for Context Compression in a Large Language
Model, ICLR 2024, arXiv:2307.06945; official code github.com/getao/icae, read at commit 469a4688,
files ``code/icae_v2/modeling_icae_multi_span.py``, ``fine_tuned_inference.py`` and its script).

Released format (v2, ``sggetao/icae``: ``mistral_7b_ft_icae.safetensors``,
``mistral_7b_pretrained_icae.safetensors``): one safetensors file of the ``ICAE`` module's trained
tensors — peft LoRA pairs ``icae.base_model.model.<module>.lora_A.default.weight`` (r, in) /
``lora_B…`` (out, r) on the base LLM (Mistral-7B-Instruct-v0.2 for the fine-tuned release; LoRA
r=512, alpha=32, peft's default targets q_proj/v_proj) and ``memory_token_embed.weight``
(mem_size + 3, hidden): the mem_size memory tokens, then the AE, LM and FT special tokens.

Compression (``ICAE._compress``): the context is cut into equal segments; each segment followed by
the mem_size memory-token embeddings runs through the LoRA-adapted LLM, and the final hidden
states (after the last norm) at the memory positions are the segment's memory slots. The frozen
base LLM (the target model, adapter off) reads the slots as input embeddings, followed by the FT
token's embedding (fine-tuned model) before the prompt. Upstream sizes segments by a mean
compression rate (``ceil(n / (mem_size * rate))`` segments, rate 4 in the released scripts);
here ``rate=0`` takes the segment count from the requested ratio instead (as many full sets of
memory slots as the budget holds, at least one), ``rate>0`` is upstream's rule.

The LoRA is applied by forward hooks on the target's own linear layers during the compression
pass only (``W x + (alpha/r) B A x``, peft's LoRA at inference), so compressor and decoder share
one copy of the base weights; the checkpoint's LoRA must therefore fit the target model.

Not reproduced: upstream keeps the chat template's left part (``<s>[INST]``) as real tokens before
the slots; lcbench compresses the whole rendered context, template tokens included.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ....errors import UserError
from ..adapter import SoftContext

MEMORY_KEY = "memory_token_embed.weight"
SPECIAL = {"ae": 0, "lm": 1, "ft": 2}  # after the mem_size memory tokens in memory_token_embed


def icae_file(path: Path) -> Path | None:
    """The ICAE safetensors file at ``path`` (the file itself, or the one file in a folder holding
    ``memory_token_embed.weight``), else None."""
    from safetensors import safe_open

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    found = []
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as st:
                if MEMORY_KEY in st.keys():
                    found.append(f)
    if len(found) > 1:
        raise UserError(f"soft_compressor format=icae: {path} holds several ICAE checkpoints "
                        f"({', '.join(f.name for f in found)}). Fix: point path= at one file.")
    return found[0] if found else None


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name in the base model: (A, B)} from peft's state-dict names."""
    pairs = {}
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        for prefix in ("icae.base_model.model.", "base_model.model."):
            module = module.removeprefix(prefix)
        b = state.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise UserError(f"soft_compressor format=icae: {key} has no matching lora_B tensor.")
        pairs[module] = (a, b)
    return pairs


@dataclass
class ICAECompressor:
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    memory: torch.Tensor  # (mem_size + 3, hidden)
    token: str  # the special token after the slots: "ft", "ae", "lm" or "none"
    rate: float  # upstream's mean compression rate; 0: segments from the requested ratio

    @property
    def mem_size(self) -> int:
        return self.memory.shape[0] - 3

    @classmethod
    def from_pretrained(cls, path: Path, lora_alpha: float = 32.0, icae_token: str = "ft", icae_rate: float = 0.0,
                        **_) -> "ICAECompressor":
        from safetensors.torch import load_file

        file = icae_file(Path(path))
        if file is None:
            raise UserError(f"soft_compressor format=icae: no safetensors file with {MEMORY_KEY} at {path}. Fix: "
                            f"point path= at an ICAE checkpoint (e.g. sggetao/icae/mistral_7b_ft_icae.safetensors).")
        state = load_file(str(file))
        lora = lora_pairs(state)
        if not lora:
            raise UserError(f"soft_compressor format=icae: {file} has no LoRA tensors (…lora_A…/…lora_B…).")
        rank = next(iter(lora.values()))[0].shape[0]
        return cls(lora, lora_alpha / rank, state[MEMORY_KEY], icae_token, icae_rate)

    @contextmanager
    def adapted(self, model):
        """The target model with the LoRA on (forward hooks), for the compression pass only."""
        modules = dict(model.named_modules())
        missing = [m for m in self.lora if m not in modules]
        if missing:
            raise UserError(f"soft_compressor format=icae: the checkpoint's LoRA targets {missing[0]}, which the "
                            f"target model lacks. Fix: run ICAE with the base model it was trained on as --model.")
        handles = []

        def hook(a, b):
            def add(module, inputs, output):
                x = inputs[0]
                return output + self.scaling * (x @ a.to(x).T) @ b.to(x).T
            return add

        for name, (a, b) in self.lora.items():
            weight = modules[name].weight
            if a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]:
                raise UserError(f"soft_compressor format=icae: LoRA {name} is {tuple(b.shape[:1])}x{tuple(a.shape[1:])} "
                                f"but the target's layer is {tuple(weight.shape)}. Fix: use the matching base model.")
            handles.append(modules[name].register_forward_hook(hook(a, b)))
        try:
            yield model
        finally:
            for h in handles:
                h.remove()

    def segments(self, n: int, ratio: float) -> list[tuple[int, int]]:
        """The context's segments: upstream's ``ceil(n / count)``-long cuts when ``rate`` is set, else
        ``count`` near-equal ones, ``count`` being as many full sets of slots as the budget holds."""
        if self.rate > 0:
            length = math.ceil(n / math.ceil(n / (self.mem_size * self.rate)))
            return [(a, min(a + length, n)) for a in range(0, n, length)]
        keep = max(1, round(n * (1.0 - ratio))) - (self.token != "none")
        count = min(n, max(1, keep // self.mem_size))
        return [(i * n // count, (i + 1) * n // count) for i in range(count)]

    def compress(self, model, ids: torch.Tensor, ratio: float) -> SoftContext:
        embed = model.get_input_embeddings()
        if embed.weight.shape[1] != self.memory.shape[1]:
            raise UserError(f"soft_compressor format=icae: memory embeddings are {self.memory.shape[1]}-wide, the "
                            f"target's hidden size is {embed.weight.shape[1]}. Fix: use the ICAE's base model as --model.")
        n = ids.shape[1]
        memory = self.memory.to(embed.weight)
        slots = []
        with torch.no_grad(), self.adapted(model):
            for start, end in self.segments(n, ratio):
                x = torch.cat([embed(ids[:, start:end]), memory[None, :self.mem_size]], 1)
                out = model(inputs_embeds=x, output_hidden_states=True, use_cache=False)
                slots.append(out.hidden_states[-1][:, -self.mem_size:])
        if self.token != "none":
            slots.append(memory[None, self.mem_size + SPECIAL[self.token]][:, None])
        embeds = torch.cat(slots, 1)
        m = embeds.shape[1]
        if m > n:
            raise UserError(f"soft_compressor format=icae: {m} memory slots for a {n}-token context would grow it "
                            f"(mem_size {self.mem_size}). Fix: use longer contexts or a lower ratio.")
        return SoftContext(positions=torch.arange(n - m, n, device=ids.device)[None], embeds=embeds)
