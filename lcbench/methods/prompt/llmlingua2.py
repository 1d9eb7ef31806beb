"""LLMLingua-2 through Microsoft's ``llmlingua`` package (the optional extra ``lcbench[llmlingua]``).

Pan et al., "LLMLingua-2: Data Distillation for Efficient and Faithful Task-Agnostic Prompt
Compression", Findings of ACL 2024 (arXiv:2403.12968): a token classifier (XLM-RoBERTa / mBERT
fine-tuned on distilled labels) keeps the words most likely labelled "preserve". Its ``rate`` is
counted in its own tokenizer; lcbench adjusts it (a few secant steps) until the output meets the
budget in the target model's tokenizer. Offline, with neither the package nor the model folder,
it fails with a message naming what to install — never silently.
"""

from __future__ import annotations

from ...errors import UserError
from ...params import Param
from .base import PromptCompressor
from .units import count_tokens

_LOADED: dict[tuple[str, str], object] = {}


def load_llmlingua2(model: str, device: str):
    """``llmlingua.PromptCompressor`` in LLMLingua-2 mode for ``model`` (cached per process)."""
    try:
        from llmlingua import PromptCompressor as Compressor
    except ImportError:
        raise UserError("llmlingua2 needs Microsoft's llmlingua package. Fix: pip install 'lcbench[llmlingua]' "
                        "(or pip install llmlingua).") from None
    key = (model, device)
    if key not in _LOADED:
        try:
            _LOADED[key] = Compressor(model_name=model, use_llmlingua2=True, device_map=device)
        except Exception as exc:  # OSError offline, tiktoken's download, a wrong folder...
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"llmlingua2 could not load its model '{model}': {first}. Fix: download it where a network is "
                f"available (huggingface-cli download {model}) and pass model=<local folder>; the llmlingua package "
                f"also fetches tiktoken's gpt-3.5-turbo encoding once (set TIKTOKEN_CACHE_DIR to a filled cache "
                f"offline).") from None
    return _LOADED[key]


class LLMLingua2(PromptCompressor):
    name = "llmlingua2"
    family = "prompt_compression"
    paper = ("Pan et al., LLMLingua-2: Data Distillation for Efficient and Faithful Task-Agnostic Prompt "
             "Compression, Findings of ACL 2024 (arXiv:2403.12968)")
    summary = "token classification by a distilled encoder, through the llmlingua package (optional extra)"
    defaults = {
        "model": "microsoft/llmlingua-2-xlm-roberta-large-meetingbank",
        "force_tokens": ['\n', '?'],
        "steps": 3,
    }
    params = (
        Param("model", str, None, "LLMLingua-2 token-classification model (hub id or local folder)"),
        Param("force_tokens", list, None, "tokens always kept (';'-separated)"),
        Param("steps", int, None, "rate adjustments to meet the budget in the target tokenizer", min=0),
    )

    def compress(self, text, budget):
        device = "cuda" if text.model is not None and next(text.model.parameters()).is_cuda else "cpu"
        compressor = load_llmlingua2(self.args["model"], device)
        total = count_tokens(text.tokenizer, text.context)
        rate = budget / total
        best, best_count = text.context, total
        for _ in range(max(1, self.args["steps"])):
            out = compressor.compress_prompt_llmlingua2([text.context], rate=min(1.0, rate),
                                                        use_context_level_filter=False,
                                                        force_tokens=list(self.args["force_tokens"]))["compressed_prompt"]
            got = count_tokens(text.tokenizer, out)
            if got <= budget and (best_count > budget or got > best_count):
                best, best_count = out, got
            elif best_count > budget and got < best_count:
                best, best_count = out, got
            if budget * 0.98 <= got <= budget:
                break
            rate *= budget / max(1, got)
        return best
