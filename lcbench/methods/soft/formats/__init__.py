"""Released checkpoint formats of trained context compressors, for the ``soft_compressor`` adapter:
``gist`` (:mod:`.gist`, Mu et al. 2023), ``icae`` (:mod:`.icae`, Ge et al. 2024), ``xrag``
(:mod:`.xrag`, Cheng et al. 2024) and ``autocompressor`` (:mod:`.autocompressor`, Chevalier et al.
2023), beside the
adapter's own ``lcbench`` format (a folder with ``lcbench_compressor.json``). ``format=auto``
picks the format from the checkpoint's files; ``path`` may be a local folder/file or a hub id
(:mod:`.source`)."""

from __future__ import annotations

from pathlib import Path

from ....errors import UserError
from ..adapter import CONFIG_NAME, SoftCompressor, load_soft_compressor
from .autocompressor import AutoCompressor, is_autocompressor_checkpoint
from .gist import GistCompressor, is_gist_checkpoint
from .icae import ICAECompressor, icae_file
from .source import resolve
from .xrag import XRAGCompressor, is_xrag_checkpoint

FORMATS = {"gist": GistCompressor, "icae": ICAECompressor, "xrag": XRAGCompressor, "autocompressor": AutoCompressor}
CHOICES = ("auto", "lcbench", *FORMATS)


def detect(path: Path) -> str:
    """The format of the checkpoint at ``path``, from its files."""
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return "lcbench"
    if icae_file(path) is not None:
        return "icae"
    if path.is_dir() and is_xrag_checkpoint(path):
        return "xrag"
    if path.is_dir() and is_autocompressor_checkpoint(path):
        return "autocompressor"
    if path.is_dir() and is_gist_checkpoint(path):
        return "gist"
    raise UserError(f"soft_compressor: {path} is not a compressor checkpoint lcbench knows: no {CONFIG_NAME} "
                    f"(lcbench's own format), no safetensors with ICAE's memory_token_embed.weight, no model folder "
                    f"whose tokenizer has gist's <GIST> token, no config.json with xRAG's projector_type or AutoCompressor's "
                    f"summary_length. Fix: point path= at one of those, or pass format=lcbench|gist|icae|xrag|autocompressor.")


def load_compressor(args: dict) -> SoftCompressor:
    """The compressor the adapter's arguments name (``path``, ``format`` and the format's options)."""
    path = resolve(args["path"])
    fmt = args.get("format", "auto")
    if fmt == "auto":
        fmt = detect(path)
    if fmt == "lcbench":
        return load_soft_compressor(str(path), args.get("trust_code", False))
    return FORMATS[fmt].from_pretrained(path, **{k: v for k, v in args.items() if k not in ("path", "format")})
