"""Run any NVIDIA kvpress press inside lcbench's engine: ``--method kvpress:SnapKVPress``.

A press (kvpress 0.5.5: ``pip install --no-deps kvpress==0.5.5`` — it pins ``transformers<5.3`` —
then ``pip install 'lcbench[kvpress]'`` for what it imports) compresses one attention layer from
``(module, hidden_states, keys, values, attentions, kwargs)``. lcbench calls it from the cache
stage, right after the layer's prefill attention, with what the engine observed:

* ``hidden_states`` — the pass's states laid side by side as ``[q | k | v]`` per token: the
  pre-RoPE queries, the pre-RoPE keys and the values; the module the press sees is the real
  attention module except that ``q_proj``/``k_proj``/``v_proj`` read those slices back, so a press
  that projects hidden states (SnapKV's window queries, Expected Attention's statistics,
  Compactor's pre-RoPE keys) gets exactly the model's states;
* ``kwargs["position_embeddings"]`` — the model's RoPE (cos, sin) at the tokens' true positions;
  ``module.rotary_emb`` — the model's rotary module (kvpress attaches it the same way);
* ``keys``/``values`` — the layer's cache; ``attentions`` — None (presses compute their own).

What the press keeps becomes a selection of the layer's slots, so lcbench keeps the true
positions, measures the bytes and composes the press with other stages (``kvpress:SnapKVPress
+kivi``). A ``ScorerPress`` is asked for its scores and lcbench keeps its top
``max(1, int(n·(1−ratio)))`` (kvpress's count) plus, in query-aware mode, the question; any other
press runs its own ``compress`` and lcbench finds which slots it returned (exact key rows);
presses that mask keys per head (AdaKVPress) give a ragged layer. Presses that change key or
value vectors (merging, key re-rotation) or act during decoding are not supported: the run stops
with an error saying so. ``post_init_from_model`` is not called (no model is handed to cache
stages), so presses that load weights there (QFilterPress, from the hub) do not run — lcbench's
own ``qfilters`` estimates its filters offline instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any, ClassVar

import torch

from ..cache.ragged import RaggedLayer
from ..errors import UserError
from ..params import Param
from .base import LayerObservation, Needs, Stage
from .dropping.rope import cos_sin, rotary_module, unrotate
from .dropping.select import keep_top, query_positions

PREFIX = "kvpress:"
KVPRESS_VERSION = "0.5.5"  # the version the bridge and tests/test_kvpress.py are checked against
INSTALL = (f"install it without its dependencies, `pip install --no-deps kvpress=={KVPRESS_VERSION}` (it pins "
           f"transformers<5.3, which would replace yours), then what it imports, `pip install 'lcbench[kvpress]'`")


def kvpress_module():
    try:
        import kvpress
    except ImportError:
        raise UserError(f"the kvpress bridge needs the kvpress package, which is not installed: {INSTALL}.") from None
    return kvpress


def press_class(class_name: str) -> type:
    """The kvpress press class named ``class_name`` (did-you-mean error otherwise)."""
    kvpress = kvpress_module()
    cls = getattr(kvpress, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, kvpress.BasePress)):
        names = [n for n in dir(kvpress) if n.endswith("Press")]
        close = difflib.get_close_matches(class_name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"kvpress has no press '{class_name}'.{hint} Presses: {', '.join(names)}.")
    return cls


def _param_type(field: dataclasses.Field) -> type | None:
    kind = field.type
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if args:  # Optional[float] and the like
        kind = args[0]
    return kind if kind in (int, float, bool, str) else None


def press_params(cls: type) -> tuple[Param, ...]:
    """lcbench parameters for a press dataclass: its simple public fields, and ``press`` (the name
    of the inner press class) for wrapper presses."""
    base = kvpress_module().BasePress
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_") or f.name == "compression_ratio":
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        if isinstance(f.type, type) and issubclass(f.type, base):
            out.append(Param(f.name, str, default, "inner press class name (e.g. SnapKVPress)"))
        elif _param_type(f) is not None:
            out.append(Param(f.name, _param_type(f), default, f"{cls.__name__}.{f.name}"))
    return tuple(out)


class PressModule:
    """The attention module as a press sees it: the real module, with q/k/v projections that read
    the pass's states back from lcbench's ``[q | k | v]`` hidden states, and the rotary module."""

    def __init__(self, module, query_width: int, key_width: int):
        self._module = module
        self.q_proj = lambda h: h[..., :query_width]
        self.k_proj = lambda h: h[..., query_width: query_width + key_width]
        self.v_proj = lambda h: h[..., query_width + key_width:]
        self.rotary_emb = rotary_module(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _row_hashes(rows: torch.Tensor) -> torch.Tensor:
    """An exact fingerprint per row of the last dim (bitwise equal rows ↔ equal hashes, but for
    collisions of a 64-bit hash)."""
    data = rows.contiguous().view(torch.uint8).reshape(*rows.shape[:-1], -1).long()
    gen = torch.Generator().manual_seed(0)
    weights = torch.randint(1, 2**62, (data.shape[-1],), generator=gen, dtype=torch.long).to(rows.device)
    return (data * weights).sum(-1)


def returned_slots(keys: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(B, H, K) slots of ``keys`` (B, H, L, D) whose rows are ``kept`` (B, H, K, D); UserError
    when a returned row is not one of the layer's keys."""
    full, part = _row_hashes(keys), _row_hashes(kept)
    order = full.argsort(dim=-1)
    sorted_full = full.gather(-1, order)
    where = torch.searchsorted(sorted_full, part).clamp(max=full.shape[-1] - 1)
    slots = order.gather(-1, where)
    found = keys.gather(2, slots[..., None].expand(*slots.shape, keys.shape[-1]))
    if not torch.equal(found, kept):
        raise UserError("this kvpress press changed the key vectors it kept (merging or re-rotating them); the "
                        "lcbench bridge runs presses that select tokens. Fix: use a selecting press, or an lcbench method.")
    return slots


class KvpressStage(Stage):
    """Base of the stage classes :func:`press_stage` makes, one per press class."""

    family = "kv_dropping"
    stages = ("cache",)
    needs = Needs(queries=True)
    press_cls: ClassVar[type]

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self.press = self._build(self.press_cls, self.args)

    def _build(self, cls: type, args: dict[str, Any]):
        kwargs = {k: v for k, v in args.items() if v is not None}
        for f in dataclasses.fields(cls):
            if f.name == "press":
                if "press" not in kwargs:
                    raise UserError(f"{self.name} wraps another press: pass it, e.g. --method-args press=SnapKVPress.")
                inner_cls = press_class(kwargs["press"])
                kwargs["press"] = inner_cls(**({"compression_ratio": self.ratio} if _has_ratio(inner_cls) else {}))
        if _has_ratio(cls):
            kwargs["compression_ratio"] = self.ratio
        try:
            press = cls(**kwargs)
        except (AssertionError, TypeError, ValueError) as exc:
            raise UserError(f"{self.name} rejected its arguments {kwargs}: {exc}") from None
        if hasattr(press, "compression_ratio"):
            press.compression_ratio = self.ratio
        return press

    def compress_layer(self, layer, seen: LayerObservation):
        if self.ratio <= 0:
            return layer
        total = seen.context_length + seen.protected
        if layer.seq_len() != total or seen.queries is None or seen.queries.shape[2] != total:
            raise UserError(f"{self.name} must see the whole compressing pass: put kvpress presses first among the "
                            f"cache stages of a chain.")
        keys, values = layer.dense()
        module, hidden, kwargs = self._inputs(layer, seen, keys, values)
        kvpress = kvpress_module()
        try:
            with torch.no_grad():
                if isinstance(self.press, kvpress.ScorerPress) and type(self.press).compress is kvpress.ScorerPress.compress:
                    scores = self.press.score(module, hidden, keys, values, None, kwargs)
                    keep = max(1, int(seen.context_length * (1 - self.ratio)))
                    return keep_top(layer, scores, self.ratio, seen, keep=keep)
                kept_keys, _ = self.press.compress(module, hidden, keys, values, None, kwargs)
        except AssertionError as exc:
            raise UserError(f"{self.name} cannot compress this input: {exc or 'a kvpress assertion failed'}") from None
        masked = module.__dict__.get("masked_key_indices")
        if masked is not None:  # per-head masking (AdaKVPress): store what is not masked, ragged
            keep = torch.ones(layer.positions.shape, dtype=torch.bool, device=keys.device)
            keep[masked] = False
            return RaggedLayer.from_layer(layer, keep)
        if kept_keys.shape == keys.shape:
            return layer
        layer.select(returned_slots(keys, kept_keys))
        return layer

    def _inputs(self, layer, seen: LayerObservation, keys: torch.Tensor, values: torch.Tensor):
        """The press's ``module``, ``hidden_states`` and ``kwargs`` for this layer's pass."""
        queries = seen.queries
        b, hq, n, d = queries.shape
        positions = query_positions(seen, queries.device)
        cos, sin = cos_sin(seen.module, positions, queries)
        pre_queries = unrotate(queries.float(), cos, sin)
        pre_keys = unrotate(keys.float(), cos, sin)

        def side(x: torch.Tensor) -> torch.Tensor:  # (B, H, n, D) → (B, n, H·D)
            return x.transpose(1, 2).reshape(b, n, -1)

        hidden = torch.cat([side(pre_queries), side(pre_keys), side(values.float())], dim=-1).to(keys.dtype)
        module = PressModule(seen.module, hq * d, keys.shape[1] * d)
        rope = (cos[None].expand(b, -1, -1).to(keys.dtype), sin[None].expand(b, -1, -1).to(keys.dtype))
        kwargs = {"position_embeddings": rope, "cache_position": positions, "position_ids": positions[None],
                  "attention_mask": None}
        return module, hidden, kwargs


def _has_ratio(cls: type) -> bool:
    return any(f.name == "compression_ratio" for f in dataclasses.fields(cls))


@functools.lru_cache(maxsize=None)
def press_stage(class_name: str) -> type[Stage]:
    """The lcbench stage class for ``kvpress:<class_name>`` (made once per press class)."""
    cls = press_class(class_name)
    doc = (cls.__doc__ or "").strip().splitlines()
    return type(f"Kvpress{class_name}", (KvpressStage,), {
        "name": PREFIX + class_name,
        "summary": f"kvpress {class_name}: {doc[0] if doc else 'a kvpress press'}",
        "paper": f"NVIDIA kvpress (github.com/NVIDIA/kvpress), {cls.__module__}.{class_name}",
        "params": press_params(cls),
        "press_cls": cls,
        "__doc__": f"kvpress's {class_name} run by lcbench's engine (see lcbench.methods.kvpress_bridge).",
    })
