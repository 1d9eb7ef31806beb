"""The adapter for trained soft compressors: a model that turns the context into input embeddings
(gist tokens, ICAE/500x-style memory slots, pooled encoder states) or straight into a KV cache for
the target model, loaded from a folder.

A compressor folder holds ``lcbench_compressor.json``::

    {"class": "package.module:ClassName"}            # an importable class, or
    {"class": "compressor.py:ClassName"}             # code in the folder (needs trust_code=true)

plus whatever the class's ``from_pretrained(folder)`` reads (weights as safetensors, a config).
The class implements :class:`SoftCompressor`. lcbench prefills what it returns in place of the
context tokens; the question that follows keeps its true position. Loading code from a folder
runs that code, like transformers' ``trust_remote_code``; hence the explicit ``trust_code``.

Released checkpoints of trained compressors (gist models, ICAE, xRAG, AutoCompressor) load without
that file, by local path or hub id: see :mod:`lcbench.methods.soft.formats` (``format=``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ...errors import UserError
from ...params import Param
from ..base import ContextInputs, Stage, keep_count

CONFIG_NAME = "lcbench_compressor.json"


@dataclass
class SoftContext:
    """What a compressor makes of the context: ``embeds`` (1, m, hidden) to prefill, or ``kv`` — per
    layer (keys, values) of shape (1, kv_heads, m, head_dim), keys already rotated at ``positions``.
    ``positions`` (1, m) are the position ids of the m slots."""

    positions: torch.Tensor
    embeds: torch.Tensor | None = None
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@runtime_checkable
class SoftCompressor(Protocol):
    """A trained context compressor (see the module doc)."""

    @classmethod
    def from_pretrained(cls, folder: str) -> "SoftCompressor":
        """Load from ``folder``."""

    def compress(self, model, ids: torch.Tensor, ratio: float) -> SoftContext:
        """Compress the context ``ids`` (1, n) for ``model``; ``ratio`` is the fraction of the context's
        KV memory to remove (in query-aware mode adjusted so that, with the uncompressed question, the
        whole prefill meets ``--ratio``); a fixed-rate compressor may ignore it."""


def load_soft_compressor(folder: str, trust_code: bool) -> SoftCompressor:
    path = Path(folder)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise UserError(f"soft_compressor: {folder} has no {CONFIG_NAME}. Fix: point path= at a compressor folder "
                        f"whose {CONFIG_NAME} names its class, e.g. {{\"class\": \"my_pkg.gist:GistCompressor\"}}.")
    target = json.loads(config_file.read_text()).get("class", "")
    module_name, _, class_name = target.partition(":")
    if not class_name:
        raise UserError(f"soft_compressor: {config_file} must name \"class\": \"module:ClassName\", got {target!r}.")
    if module_name.endswith(".py"):
        if not trust_code:
            raise UserError(f"soft_compressor: {folder} ships its own code ({module_name}); running it needs "
                            f"trust_code=true. Fix: read the code, then pass --method-args trust_code=true.")
        spec = importlib.util.spec_from_file_location(f"lcbench_soft_{abs(hash(str(path)))}", path / module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserError(f"soft_compressor: cannot import {module_name} ({exc}). Fix: install the package that "
                            f"provides it.") from None
    cls = getattr(module, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UserError(f"soft_compressor: {target} is not a class with from_pretrained(folder).")
    compressor = cls.from_pretrained(str(path))
    if not isinstance(compressor, SoftCompressor):
        raise UserError(f"soft_compressor: {target} must implement compress(model, ids, ratio) -> SoftContext.")
    return compressor


def write_kv(cache, kv: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor, model) -> None:
    """Store a compressor's per-layer keys/values in the engine's cache."""
    if len(kv) != len(cache.layers):
        raise UserError(f"soft_compressor returned KV for {len(kv)} layers; the model has {len(cache.layers)}.")
    dtype = next(model.parameters()).dtype
    for layer, (k, v) in zip(cache.layers, kv):
        layer.append(k.to(positions.device, dtype), v.to(positions.device, dtype), positions, None)


class SoftCompressorStage(Stage):
    name = "soft_compressor"
    family = "soft_compression"
    paper = ("adapter for trained compressors, e.g. Mu et al., Learning to Compress Prompts with Gist "
             "Tokens, NeurIPS 2023; Ge et al., In-context Autoencoder (ICAE), ICLR 2024")
    summary = ("a trained compressor loaded from a folder turns the context into input embeddings or a KV "
               "cache")
    tolerance = 0.05
    defaults = {"path": "", "trust_code": False, "format": "auto", "gist_tokens": 0, "lora_alpha": 32.0,
                "icae_token": "ft", "icae_rate": 0.0, "retriever": ""}
    stages = ("context_inputs",)
    params = (
        Param("path", str, None, "a trained compressor: folder/file or hub id (lcbench_compressor.json, or a released "
              "gist/ICAE/xRAG/AutoCompressor checkpoint)"),
        Param("trust_code", bool, None, "allow running code shipped in the compressor folder"),
        Param("format", str, None, "checkpoint format (auto: from its files; see methods/soft/formats)",
              choices=("auto", "lcbench", "gist", "icae", "xrag", "autocompressor")),
        Param("gist_tokens", int, None, "gist: number of <GIST> tokens (0: from the name *-gist-K, else 1)", min=0),
        Param("lora_alpha", float, None, "icae: LoRA alpha (the release: 32; r is read from the weights)", min=0),
        Param("icae_token", str, None, "icae: special token after the memory slots", choices=("ft", "ae", "lm", "none")),
        Param("icae_rate", float, None, "icae: upstream mean compression rate (0: segments from --ratio)", min=0),
        Param("retriever", str, None, "xrag: the retriever (hub id or folder; empty: Salesforce/SFR-Embedding-Mistral)"),
    )

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self._compressor: SoftCompressor | None = None

    def context_inputs(self, model, ids, context_length, cache):
        if self.ratio <= 0:
            return None
        if not self.args["path"]:
            raise UserError("soft_compressor needs path=<compressor folder>. Fix: --method-args path=/path/to/compressor.")
        if self._compressor is None:
            from .formats import load_compressor  # released formats (gist, icae) or lcbench_compressor.json

            self._compressor = load_compressor(self.args)
        question = ids.shape[1] - context_length  # query-aware: kept as is, and counted in the budget
        keep = max(1, keep_count(context_length + question, self.ratio) - question)
        soft = self._compressor.compress(model, ids[:, :context_length], 1.0 - keep / context_length)
        rest_ids = ids[:, context_length:]
        rest_pos = torch.arange(context_length, ids.shape[1], device=ids.device)[None]
        rest = model.get_input_embeddings()(rest_ids)
        positions = soft.positions.to(ids.device)
        if soft.kv is not None:
            write_kv(cache, soft.kv, positions, model)
            return ContextInputs(rest, rest_pos) if rest_ids.shape[1] else ContextInputs(None, None)
        if soft.embeds is None:
            raise UserError("soft_compressor: the compressor returned neither embeds nor kv.")
        return ContextInputs(torch.cat([soft.embeds.to(rest.dtype), rest], dim=1), torch.cat([positions, rest_pos], dim=1))
