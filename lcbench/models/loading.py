"""Load a causal LM and its tokenizer, and switch it to lcbench's attention function.

``--model`` is a registered name (``lcbench ls models``) or anything ``from_pretrained``
accepts (a hub id or a local folder); ``--model-args`` passes ``dtype``, ``attn_implementation``
(the implementation *wrapped* for plain passes, default sdpa), ``gguf_file``, ``revision``,
``trust_remote_code``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError, out_of_memory
from ..params import Param, ParamSet
from ..registry import Registry
from ..spec import DEFAULT_MODEL  # the run declaration holds the default model's name

MODELS: Registry = Registry("model", "lcbench.models")
MODELS.add(DEFAULT_MODEL, "lcbench.models.default:load_smollm2")
MODELS.add("tiny-random-llama", "lcbench.models.tiny:load_tiny_random_llama")

MODEL_PARAMS = ParamSet((
    Param("dtype", str, "auto", "torch dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16"),
    Param("gguf_file", str, None, "GGUF file inside the model folder/repo (transformers dequantizes it)"),
    Param("revision", str, None, "hub revision"),
    Param("trust_remote_code", bool, False, "allow the model repo's own code"),
    Param("local_files_only", bool, False, "never touch the network"),
    Param("attn_implementation", str, "sdpa", "dense attention inside lcbench's attention hook", ("sdpa", "eager")),
    Param("device_map", str, None, "spread a model too large for one GPU over every visible GPU (accelerate "
          "placement; memory is measured across them)", ("auto", "balanced", "balanced_low_0", "sequential")),
))


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    source: str  # where it came from (hub id, folder, gguf), for the RunSpec
    info: dict = field(default_factory=dict)
    dense_attention: str = "sdpa"  # how lcbench's attention computes dense attention: sdpa or eager

    @property
    def max_length(self) -> int:
        """The context length the model was trained for, from its *text* config (a multimodal
        checkpoint such as Gemma-3 instruct keeps it there, not on the top-level config); 4096 when
        the config states none."""
        from .hook import text_config

        cfg = text_config(self.model)
        return int(getattr(cfg, "max_position_embeddings", 0) or getattr(self.model.config, "max_position_embeddings", 0)
                   or 4096)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise UserError(f"dtype '{name}' is not known. Fix: use float32, bfloat16 or float16.") from None


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UserError(f"--device {device!r} is not a device torch knows. Fix: --device cpu, cuda or cuda:N.")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} was requested but no CUDA device is available. Fix: --device cpu.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s). "
                        f"Fix: --device cuda:0 … cuda:{torch.cuda.device_count() - 1}.")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device} was requested but MPS is not available. Fix: --device cpu.")
    if parsed.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UserError(f"--device {device} was requested but no XPU is available. Fix: --device cpu.")
    return device


def gguf_location(name_or_path: str, kw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``--model path/to/model.gguf``: from_pretrained takes a GGUF as ``gguf_file`` inside its folder
    (transformers dequantizes it), so a path to the file itself becomes (its folder, gguf_file=name);
    anything else is returned as it is."""
    if name_or_path.endswith(".gguf") and Path(name_or_path).is_file() and not kw.get("gguf_file"):
        gguf = Path(name_or_path).resolve()
        return str(gguf.parent), {**kw, "gguf_file": gguf.name}
    return name_or_path, kw


def read_config(name_or_path: str, kw: dict[str, Any]):
    """The checkpoint's config, read before any weights are fetched; None when it cannot be read
    for a reason ``from_pretrained`` reports better (not found, no network: an ``OSError``). A
    config transformers cannot make sense of (a ``model_type`` this transformers does not know, a
    repository whose own code must be trusted first) is a :class:`UserError` naming the fix."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, **kw)
    except OSError:
        return None
    except ValueError as exc:
        import transformers

        if "trust_remote_code" in str(exc):
            fix = ("the repository ships its own model code: read it, then pass --model-args trust_remote_code=true "
                   "to run it")
        elif kw.get("gguf_file"):
            fix = "transformers reads only some GGUF architectures: pass the model's safetensors checkpoint instead"
        else:
            fix = (f"a model type newer than this transformers needs a newer one (pip install -U "
                   f"'{transformers_pin()}'); a repository with its own model code needs --model-args "
                   f"trust_remote_code=true")
        raise UserError(f"model '{name_or_path}': transformers {transformers.__version__} cannot read its config: "
                        f"{str(exc).splitlines()[0]} Fix: {fix}.") from None


def transformers_pin() -> str:
    """The transformers requirement lcbench is installed with (its pyproject's pin)."""
    from importlib import metadata

    try:
        return next(r for r in metadata.requires("lcbench") or [] if r.replace(" ", "").startswith("transformers"))
    except (metadata.PackageNotFoundError, StopIteration):
        return "transformers"


def refuse_before_loading(name_or_path: str, cfg) -> None:
    """Refuse, before any weights are fetched, an architecture the post-load probe would refuse
    anyway (:func:`lcbench.models.hook.config_refusal`)."""
    from .hook import config_refusal

    reason = config_refusal(cfg) if cfg is not None else None
    if reason:
        raise UserError(f"model '{name_or_path}': {reason}")


def auto_class(name_or_path: str, cfg):
    """The transformers auto class that builds a text generator from this config: a causal LM
    (``AutoModelForCausalLM``, which also maps Gemma-3/3n/4 and Llama-4 instruct checkpoints to
    their vision-language classes), else a vision-language model that generates text from text
    alone (``AutoModelForImageTextToText``: Mistral-Small-3.x ``mistral3``, Qwen2/2.5/3-VL, LLaVA,
    ...; lcbench feeds it text only and takes over its text layers). Anything else — an encoder,
    an encoder-decoder, an audio or vision-only model — is refused with exit 2."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if cfg is None:
        return AutoModelForCausalLM  # from_pretrained reports why the config could not be read
    auto_map = getattr(cfg, "auto_map", None) or {}
    model_type = getattr(cfg, "model_type", "")
    if "AutoModelForCausalLM" in auto_map or model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    if "AutoModelForImageTextToText" in auto_map or model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    raise UserError(
        f"model '{name_or_path}' is a '{model_type}' model ({', '.join(getattr(cfg, 'architectures', None) or ['?'])}), "
        f"which is neither a causal LM nor a vision-language model that generates text, so lcbench cannot "
        f"decode with it. Fix: pass a decoder (causal LM) checkpoint; `lcbench ls models` lists registered ones."
    )


def load_pretrained(name_or_path: str, args: dict[str, Any], device: str) -> LoadedModel:
    """``from_pretrained`` by hub id or local path, exactly as users expect."""
    from transformers import AutoTokenizer

    dtype = resolve_dtype(args.get("dtype"), device)
    kw = {k: args[k] for k in ("gguf_file", "revision", "trust_remote_code", "local_files_only") if args.get(k) is not None}
    source = name_or_path
    name_or_path, kw = gguf_location(name_or_path, kw)
    try:
        cfg = read_config(name_or_path, kw)
        refuse_before_loading(source, cfg)
        auto = auto_class(source, cfg)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kw)
        config = {} if cfg is None else {"config": cfg}  # read once, above
        model = auto.from_pretrained(name_or_path, dtype=dtype, **config, **kw, **device_placement(args, device))
    except OSError as exc:
        raise UserError(
            f"could not load model '{source}': {str(exc).splitlines()[0]} "
            f"Fix: pass a local folder with config.json and weights, a reachable hub id, or a registered "
            f"name (`lcbench ls models`)."
        ) from None
    except ImportError as exc:  # transformers' requires_backends: timm, sentencepiece, tiktoken, ...
        raise UserError(f"model '{source}' needs a package that is not installed: {' '.join(str(exc).split())} "
                        f"Fix: install the package named above, then run again.") from None
    except ValueError as exc:  # a tokenizer or checkpoint transformers cannot build as it is
        raise UserError(f"could not load model '{source}': {' '.join(str(exc).split())[:600]} Fix: check the "
                        f"checkpoint's files and --model-args (a tokenizer may need sentencepiece, tiktoken or "
                        f"protobuf installed).") from None
    if not args.get("device_map"):  # a device_map has placed the weights already
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, source, source, {"dtype": str(dtype).replace("torch.", "")})


def does_not_fit(source: str, device: str, exc: BaseException) -> UserError:
    """Loading ran out of memory (exit 2: nothing was written, the model chosen is what is too big)."""
    spread = "" if torch.device(device).type == "cpu" else ", --model-args device_map=auto (over several GPUs)"
    return UserError(f"model '{source}' does not fit in the memory of {device}: {' '.join(str(exc).split())[:300]} "
                     f"Fix: --model-args dtype=bfloat16 (half of float32){spread}, or a smaller model.")


def device_placement(args: dict[str, Any], device: str) -> dict[str, Any]:
    """``from_pretrained``'s ``device_map`` for ``--model-args device_map=...`` (accelerate),
    refused with a clear error off CUDA or without accelerate."""
    placement = args.get("device_map")
    if not placement:
        return {}
    if torch.device(device).type != "cuda":
        raise UserError(f"device_map={placement} spreads a model over GPUs, but --device is {device}. "
                        f"Fix: --device cuda, or drop device_map.")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise UserError("device_map needs accelerate, which is not installed. Fix: pip install accelerate.") from None
    return {"device_map": placement}


def refuse_unused_args(name: str, loader, args: dict[str, Any]) -> None:
    """A registered loader that lists the ``--model-args`` it reads (``loader.model_args``) refuses
    the others set away from their defaults (``args`` are resolved): a model argument it ignored
    would be recorded in the spec (and the run id) as if the run had used it. The engine reads
    ``attn_implementation`` for every model; a plugin's loader that lists nothing is handed every
    argument, as before."""
    honoured = getattr(loader, "model_args", None)
    if honoured is None:
        return
    unused = sorted(p.name for p in MODEL_PARAMS.params
                    if args.get(p.name) != p.default and p.name not in (*honoured, "attn_implementation"))
    if unused:
        raise UserError(f"model '{name}' is built by lcbench and does not read --model-args {', '.join(unused)} "
                        f"(it reads: {', '.join(sorted({*honoured, 'attn_implementation'}))}). Fix: drop "
                        f"{', '.join(unused)}, or pass a hub id or folder, which from_pretrained loads with them.")


def load_model(name: str, model_args: dict[str, str] | None, device: str | None = None) -> LoadedModel:
    """Load ``name`` (registered or ``from_pretrained``) on ``device``. The engine switches it to
    lcbench's attention (:func:`lcbench.engine.attach.use_lcbench_attention`, computing dense
    attention as ``dense_attention`` says); models never import the engine."""
    device = resolve_device(device)
    args = MODEL_PARAMS.resolve(model_args or {}, f"model '{name}'")
    try:
        if name in MODELS:
            loader = MODELS.get(name)
            refuse_unused_args(name, loader, args)
            loaded = loader(args, device)
        else:
            loaded = load_pretrained(name, args, device)
    except (RuntimeError, MemoryError) as exc:
        if not out_of_memory(exc):
            raise
        raise does_not_fit(name, device, exc) from None
    if loaded.tokenizer.pad_token_id is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    loaded.dense_attention = args.get("attn_implementation") or "sdpa"
    return loaded
