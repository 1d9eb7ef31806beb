"""DuoAttention: retrieval heads keep the full cache, streaming heads their sinks and a recent window.

Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads",
ICLR 2025 (arXiv:2410.10819); official code mit-han-lab/duo-attention@fe93c31 and kvpress 0.5.5
``DuoAttentionPress``.

Each KV head has a score (how much it needs the full context). The paper *trains* one gate per head
on synthetic passkey samples (``duo_attn/train.py``); that needs training and is not done here. What
lcbench runs, training-free, as kvpress's ``on_the_fly_scoring=True`` does
(``duo_attention_on_the_fly``), is found once per model in :meth:`DuoAttention.calibrate` (cached by
the engine, recorded in spec.json): for each calibration sample and layer, the mean pre-rotary query
and mean pre-rotary key over the sample's tokens are repeated at positions ``0..q_len−1`` and rotated;
the last query's attention over those keys is cumulated, and the area under that curve (its mean),
averaged over each KV head's query heads and over the samples, is the head's score — a head that
attends far back scores high. Alternatively a trained pattern in the official layout is read
(``full_attention_heads.tsv``, clipped to [0, 1], and ``config.json``'s ``sink_size`` and
``recent_size``, as ``duo_attn.utils.load_attn_pattern`` reads it) and no calibration pass runs:
``pattern=<dir>``, or ``pattern=official`` / ``official:<model>/<run>``, the paper's trained gates
fetched from the official repository at a pinned commit (:mod:`.duo_patterns`; the source URL is
kept with the cached calibration).

Calibration samples (``texts``): ``random`` (the default, so the method runs offline): ``num_samples``
sequences of ``sample_tokens`` token ids drawn uniformly (seed 42) from the tokenizer's non-special
vocabulary; ``booksum``: kvpress's source, ``num_samples`` chapters of the hub dataset
``kmfoda/booksum`` (train split) drawn with pandas ``sample(random_state=42)``, through ``datasets``;
or a local file: a ``.jsonl`` (one sample per line, its ``text`` or ``chapter`` field) or a text file
(paragraphs separated by blank lines), the first ``num_samples`` used in order. Text samples are cut to
``sample_tokens`` tokens (0: whole, as kvpress tokenizes whole chapters).

Streaming heads are the lowest-scoring ones, over all layers together (kvpress's global argsort); a
streaming head keeps its first ``sink_size`` tokens and its last ``recent_size`` (kvpress masks
``sink_size:-recent_size``; the official on-the-fly defaults are 128 and 256, the trained patterns'
configs the same). Two modes (``mode``):

``heads``  kvpress's and the paper's: ``round(head_fraction · heads)`` streaming heads; the achieved
           ratio is whatever that gives, ``--ratio`` is only the floor the engine checks (use
           ``--ratio 0`` to measure). Keeps exactly kvpress's positions on a fixed input
           (tests/test_kvpress_natives_more.py).
``ratio``  lcbench's ratio mode (default, so ``--ratio`` is honoured; not in the paper): streaming heads
           are added in score order, fewest first, until the requested ratio can be reached with each
           keeping at least its sinks and recent window; the tokens to drop are then spread evenly over
           them (their recent windows widen past ``recent_size`` when fewer must go). When even every
           head cut to ``sink_size + recent_size`` cannot reach the ratio (a context not much longer than
           that), every head is streaming with a narrower recent window, then fewer sinks. On a model with
           several kinds of layer (``config.layer_types``: Gemma-2/3's sliding-window and global
           layers hold different numbers of tokens) each kind reaches the ratio over its own layers,
           its heads ranked among themselves.

Heads then hold different numbers of tokens: the layer becomes a ragged one (bytes fall with the
kept tokens). kvpress masks the streaming heads' keys and stores everything; lcbench stores only the
kept tokens. ``--budget`` is refused (budgets are per head by design here).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch

from ...cache.ragged import RaggedLayer
from ...errors import UserError
from ...params import Param
from ..base import LayerObservation, Stage, keep_count
from .duo_patterns import is_official, official_folder
from .rope import rotate
from .select import context_slots, real_context_slots
from .simlayerkv import fewest_first, recency_scores


def calibration_samples(tokenizer, texts: str, num_samples: int, sample_tokens: int) -> list[list[int]]:
    """The token ids of the calibration samples (see the module docstring for the sources)."""
    if texts == "random":
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
        gen = torch.Generator().manual_seed(42)
        length = sample_tokens or 1024
        return [vocab[torch.randint(len(vocab), (length,), generator=gen)].tolist() for _ in range(num_samples)]
    if texts == "booksum":
        try:
            from datasets import load_dataset

            frame = load_dataset("kmfoda/booksum", split="train").to_pandas()
        except Exception as error:  # network, hub or cache: say how to run without it
            raise UserError(f"duoattention: could not load the calibration texts kmfoda/booksum ({error}). Fix: "
                            f"run online once (the hub caches it), or pass texts=random or texts=<a local .jsonl "
                            f"or .txt file>.") from error
        chosen = frame.sample(num_samples, random_state=42)["chapter"].tolist()
    else:
        path = Path(texts)
        if not path.is_file():
            raise UserError(f"duoattention: texts={texts!r} is neither random, booksum nor a file. Fix: pass one "
                            f"of those (a .jsonl with a text or chapter field per line, or a text file whose "
                            f"paragraphs are separated by blank lines).")
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
            chosen = [r.get("text", r.get("chapter", "")) for r in rows]
        else:
            chosen = [p.strip() for p in raw.split("\n\n") if p.strip()]
        chosen = [t for t in chosen if t][:num_samples]
        if not chosen:
            raise UserError(f"duoattention: {path} holds no text. Fix: pass a file with calibration text.")
    out = [tokenizer(t)["input_ids"] for t in chosen]
    return [ids[:sample_tokens] if sample_tokens else ids for ids in out]


def layer_cos_sin(model, layer_idx: int, q_len: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin) (q_len, D) of the model's rotary embedding at positions 0..q_len-1, for the
    layer's kind where the rotary differs by layer type (Gemma-3's local and global layers)."""
    rotary = model.model.rotary_emb
    positions = torch.arange(q_len, device=like.device)[None]
    kwargs = {}
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        kwargs["layer_type"] = model.config.layer_types[layer_idx]
    cos, sin = rotary(like.float()[None], positions, **kwargs)
    if cos.shape[-1] != like.shape[-1]:
        raise UserError(f"duoattention: partial rotary embeddings ({cos.shape[-1]} of {like.shape[-1]} dims) are not "
                        f"supported by its head scoring. Fix: use a model with full-dimension RoPE, or pattern=<dir>.")
    return cos[0].float(), sin[0].float()


def head_scores(model, samples: list[list[int]], q_len: int) -> torch.Tensor:
    """(layers, KV heads) DuoAttention on-the-fly scores: the area under the cumulated attention of
    the last of ``q_len`` repeated mean queries over the repeated mean keys, mean over samples."""
    layers = model.model.layers
    captured: dict[tuple[int, str], torch.Tensor] = {}

    length = [0]  # tokens of the sample being run

    def grab(idx: int, which: str, head_dim: int):
        def hook(module, args, output):
            # q_proj/k_proj: (1, T, H·D); a q_norm/k_norm: (1, T, H, D) (Qwen-3) or (1, H, T, D) (Gemma-3)
            if output.dim() == 3:
                output = output.reshape(output.shape[0], output.shape[1], -1, head_dim)
            token_dim = 1 if output.shape[1] == length[0] else 2
            captured[(idx, which)] = output.float().mean(token_dim)[0]  # (H, D): the mean over tokens
        return hook

    hooks = []
    for idx, layer in enumerate(layers):
        attn = layer.self_attn
        d = attn.head_dim
        q_mod = attn.q_norm if getattr(attn, "q_norm", None) is not None else attn.q_proj  # as RoPE sees it
        k_mod = attn.k_norm if getattr(attn, "k_norm", None) is not None else attn.k_proj
        hooks += [q_mod.register_forward_hook(grab(idx, "q", d)), k_mod.register_forward_hook(grab(idx, "k", d))]
    cfg = model.config
    scores = torch.zeros(len(layers), cfg.num_key_value_heads)
    device = next(model.parameters()).device
    try:
        for ids in samples:
            captured.clear()
            length[0] = len(ids)
            with torch.no_grad():
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            for idx, layer in enumerate(layers):
                q, k = captured[(idx, "q")], captured[(idx, "k")]  # (Hq, D), (Hkv, D)
                cos, sin = layer_cos_sin(model, idx, q_len, q)
                last_q = rotate(q, cos[-1], sin[-1])  # the last query, (Hq, D)
                keys = rotate(k[:, None, :], cos[None], sin[None])  # (Hkv, q_len, D)
                keys = keys.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
                attn = (torch.einsum("hd,hkd->hk", last_q, keys) / q.shape[-1] ** 0.5).softmax(-1)
                area = attn.cumsum(-1).mean(-1)  # (Hq,)
                scores[idx] += area.view(k.shape[0], -1).mean(-1).cpu() / len(samples)
    finally:
        for h in hooks:
            h.remove()
    return scores


def same_kind(seen: LayerObservation) -> tuple[int, ...]:
    """The layers of ``seen``'s attention kind (``config.layer_types``: a sliding-window layer holds
    fewer tokens than a full one), or every layer when the model has one kind."""
    kinds = getattr(getattr(seen.module, "config", None), "layer_types", None)
    if not kinds or len(kinds) != seen.num_layers:
        return tuple(range(seen.num_layers))
    return tuple(i for i, kind in enumerate(kinds) if kind == kinds[seen.layer_idx])


class DuoAttention(Stage):
    name = "duoattention"
    hybrid_layers = False  # it hooks every decoder layer's self_attn and scores num_hidden_layers × KV heads
    family = "kv_dropping"
    paper = ("Xiao et al., DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming "
             "Heads, ICLR 2025 (arXiv:2410.10819)")
    summary = ("streaming heads (lowest on-the-fly head scores, calibrated once per model) keep sinks + a recent "
               "window, retrieval heads everything; ratio mode picks the streaming heads for --ratio")
    params = (
        Param("mode", str, "ratio", "ratio: as many streaming heads as --ratio needs (lcbench's); heads: "
              "head_fraction of the heads are streaming (kvpress's head_compression_ratio)", choices=("ratio", "heads")),
        Param("head_fraction", float, 0.5, "heads mode: fraction of all KV heads that are streaming", min=0.0, max=1.0),
        Param("sink_size", int, 128, "initial tokens a streaming head keeps", min=0),
        Param("recent_size", int, 256, "latest tokens a streaming head keeps", min=1),
        Param("texts", str, "random", "calibration samples: random, booksum (kvpress's, from the hub) or a "
              ".jsonl/.txt file"),
        Param("num_samples", int, 50, "calibration samples", min=1),
        Param("sample_tokens", int, 1024, "tokens per calibration sample (random: its length; texts: a cut, "
              "0 = whole)", min=0),
        Param("q_len", int, 500, "positions the mean query and key are repeated over", min=2),
        Param("pattern", str, "", "a trained pattern: official (the loaded checkpoint's, fetched from "
              "mit-han-lab/duo-attention@fe93c31), official:<model>/<run>, or a directory in the official layout "
              "(full_attention_heads.tsv, config.json); its sink_size and recent_size replace the params; empty: "
              "calibrate on the fly"),
    )
    calibration_params = ("texts", "num_samples", "sample_tokens", "q_len", "pattern")
    token_budget = False

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self.begin_sample()

    def begin_sample(self) -> None:
        self._keep: dict[tuple[int, ...], dict] = {}  # kind of layer → {(layer, head): context slots kept}

    def calibrate(self, model, tokenizer):
        a = self.args
        if is_official(a["pattern"]):
            folder, source = official_folder(a["pattern"], model)
            return {**self.load_pattern(folder, model), "source": source}
        if a["pattern"]:
            return self.load_pattern(Path(a["pattern"]), model)
        samples = calibration_samples(tokenizer, a["texts"], a["num_samples"], a["sample_tokens"])
        return {"scores": head_scores(model, samples, a["q_len"])}

    @staticmethod
    def load_pattern(folder: Path, model) -> dict:
        tsv, config = folder / "full_attention_heads.tsv", folder / "config.json"
        if not tsv.is_file() or not config.is_file():
            raise UserError(f"duoattention: pattern={folder} lacks full_attention_heads.tsv or config.json. Fix: "
                            f"pass a directory of mit-han-lab/duo-attention's attn_patterns/<model>/<run>/.")
        scores = torch.from_numpy(np.clip(np.loadtxt(tsv, dtype=float, delimiter="\t", ndmin=2), 0, 1)).float()
        cfg = model.config
        if tuple(scores.shape) != (cfg.num_hidden_layers, cfg.num_key_value_heads):
            raise UserError(f"duoattention: the pattern holds {tuple(scores.shape)} head scores but the model has "
                            f"{cfg.num_hidden_layers} layers × {cfg.num_key_value_heads} KV heads. Fix: use the "
                            f"pattern trained for this model.")
        meta = json.loads(config.read_text())
        return {"scores": scores, "sink_size": int(meta["sink_size"]), "recent_size": int(meta["recent_size"])}

    def _scores(self) -> torch.Tensor:
        if self.calibration is None:
            raise UserError("duoattention has no head scores: its calibration did not run. Fix: run it through "
                            "lcbench's engine (which calibrates once per model), or set stage.calibration = "
                            "stage.calibrate(model, tokenizer).")
        return self.calibration["scores"].float()

    def window(self) -> tuple[int, int]:
        cal = self.calibration or {}
        return int(cal.get("sink_size", self.args["sink_size"])), int(cal.get("recent_size", self.args["recent_size"]))

    def streaming_order(self) -> list[tuple[int, int]]:
        """Every (layer, KV head), lowest score (most streaming) first."""
        scores = self._scores()
        flat = scores.flatten().argsort(stable=True).tolist()
        return [(i // scores.shape[1], i % scores.shape[1]) for i in flat]

    def allocate(self, n: int, protected: int, layers: list[int]) -> dict[tuple[int, int], int]:
        """(layer, head) → context slots kept, for the streaming heads among ``layers`` (one kind of
        layer, each holding ``n`` context slots) on this sample."""
        sink, recent = self.window()
        order = self.streaming_order()
        paper_keep = min(n, sink + max(0, recent - protected))
        if self.args["mode"] == "heads":  # kvpress: the lowest-scoring fraction over every layer
            count = round(len(order) * self.args["head_fraction"])
            return {unit: paper_keep for unit in order[:count] if unit[0] in layers}
        if self.ratio <= 0:
            return {}
        order = [unit for unit in order if unit[0] in layers]
        drop = len(order) * (n + protected - keep_count(n + protected, self.ratio))
        floor = [paper_keep] * len(order)
        narrow = [min(n, 1 if protected == 0 else 0)] * len(order)  # sinks go last: spread keeps them
        kept = fewest_first(list(range(len(order))), [n] * len(order), floor, narrow, drop)
        return {order[i]: keep for i, keep in kept.items()}

    def compress_layer(self, layer, seen: LayerObservation):
        n = context_slots(layer, seen)
        if n <= 1 or (self.args["mode"] == "ratio" and self.ratio <= 0):
            return layer
        kind = same_kind(seen)
        if kind not in self._keep:
            self._keep[kind] = self.allocate(real_context_slots(layer, seen), seen.protected, list(kind))
        plan = self._keep[kind]
        b, h, _ = layer.positions.shape
        keep_counts = torch.tensor([plan.get((seen.layer_idx, head), n) for head in range(h)])
        if bool((keep_counts >= n).all()):
            return layer
        sink, _ = self.window()
        scores = recency_scores(layer, sink)[..., :n]
        if layer.valid is not None:
            scores = scores.masked_fill(~layer.valid[..., :n], float("-inf"))
        rank = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = kept first
        keep = rank < keep_counts.to(rank.device)[None, :, None]
        tail = torch.ones((b, h, seen.protected), dtype=torch.bool, device=keep.device)
        return RaggedLayer.from_layer(layer, torch.cat([keep, tail], dim=-1))
