"""DuoAttention's trained head patterns, fetched from the official repository.

mit-han-lab/duo-attention@fe93c31 publishes, under ``attn_patterns/<model>/<run>/``, the gates
trained for six checkpoints (``full_attention_heads.tsv``: one score per layer and KV head;
``config.json``: the run's ``sink_size`` and ``recent_size``). kvpress's ``DuoAttentionPress``
downloads them from the repository's ``main`` branch by the model's hub id
(``PATTERNS_DICT``, ``load_attention_pattern``); lcbench pins the commit, so a pattern cannot
change under a recorded run. ``pattern=official`` picks the pattern of the loaded checkpoint (its
``name_or_path``); ``pattern=official:<model>/<run>`` names one. The two files are fetched once
(``LCBENCH_MIRROR`` points the download at a mirror) into lcbench's cache and read from there
after, offline too.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

from ...downloads import downloads_disabled, fetch, network_down
from ...errors import UserError
from ...paths import lcbench_cache

REPO = "mit-han-lab/duo-attention"
COMMIT = "fe93c314ae87306ef6629dc16713250b4718ffe7"
RAW = "https://raw.githubusercontent.com/{repo}/{commit}/attn_patterns/{pattern}/{name}"
FILES = ("config.json", "full_attention_heads.tsv")

_PASSKEY_32K = "lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10"
# hub id → attn_patterns/<model>/<run> at COMMIT (the official repository's folders; hub ids as
# kvpress's PATTERNS_DICT maps them, plus Llama-3.1's current hub name)
PATTERNS: dict[str, str] = {
    "togethercomputer/Llama-2-7B-32K-Instruct": f"Llama-2-7B-32K-Instruct/{_PASSKEY_32K}",
    "gradientai/Llama-3-8B-Instruct-Gradient-1048k": f"Llama-3-8B-Instruct-Gradient-1048k/{_PASSKEY_32K}",
    "gradientai/Llama-3-8B-Instruct-Gradient-4194k": f"Llama-3-8B-Instruct-Gradient-4194k/{_PASSKEY_32K}",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "Meta-Llama-3.1-8B-Instruct/lr=0.02-reg=0.05-ctx=1000_128000-multi_passkey10",
    "meta-llama/Llama-3.1-8B-Instruct": "Meta-Llama-3.1-8B-Instruct/lr=0.02-reg=0.05-ctx=1000_128000-multi_passkey10",
    "mistralai/Mistral-7B-Instruct-v0.2": f"Mistral-7B-Instruct-v0.2/{_PASSKEY_32K}",
    "mistralai/Mistral-7B-Instruct-v0.3": f"Mistral-7B-Instruct-v0.3/{_PASSKEY_32K}",
}


def is_official(pattern: str) -> bool:
    return pattern == "official" or pattern.startswith("official:")


def official_name(pattern: str, model) -> str:
    """The ``<model>/<run>`` folder ``pattern`` names (``official``: the loaded checkpoint's)."""
    if pattern.startswith("official:"):
        name = pattern.split(":", 1)[1].strip("/")
        if name.count("/") != 1 or ".." in name.split("/"):
            raise UserError(f"duoattention: pattern={pattern} must name attn_patterns/<model>/<run> of {REPO}, e.g. "
                            f"pattern=official:{next(iter(PATTERNS.values()))}.")
        return name
    hub_id = str(getattr(model.config, "name_or_path", "") or getattr(model.config, "_name_or_path", ""))
    if hub_id not in PATTERNS:
        raise UserError(f"duoattention: pattern=official has no trained pattern for '{hub_id or 'this model'}' "
                        f"({REPO}@{COMMIT[:7]} trained {', '.join(sorted(PATTERNS))}). Fix: leave pattern empty "
                        f"(on-the-fly head scores), pass pattern=official:<model>/<run>, or a folder of your own.")
    return PATTERNS[hub_id]


def url(name: str, file: str) -> str:
    return RAW.format(repo=REPO, commit=COMMIT, pattern=name, name=file)


def official_folder(pattern: str, model) -> tuple[Path, str]:
    """The local folder holding the official pattern (fetched on first use) and its source URL."""
    name = official_name(pattern, model)
    folder = lcbench_cache("duo-attention", COMMIT[:7], *name.split("/"))
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        blocked = downloads_disabled()
        if blocked:
            raise UserError(f"duoattention: the official pattern {name} is not cached and {blocked} forbids "
                            f"downloads. Fix: unset {blocked} for one run, or download {', '.join(FILES)} from "
                            f"{url(name, '')} into a folder and pass pattern=<that folder>.")
        folder.mkdir(parents=True, exist_ok=True)
        for file in missing:
            try:
                body = fetch(url(name, file))
            except (urllib.error.URLError, OSError) as exc:
                why = "no connection" if network_down(exc) else str(exc)
                raise UserError(f"duoattention: could not fetch {url(name, file)} ({why}). Fix: check the network "
                                f"or the pattern's name (pattern=official:<model>/<run>), or download "
                                f"{', '.join(FILES)} into a folder and pass pattern=<that folder>.") from None
            part = folder / f"{file}.part"
            part.write_bytes(body)
            part.replace(folder / file)
    return folder, url(name, "")
