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
import inspect
import typing
from typing import Any, ClassVar

import torch

from ..cache.layer import DenseLayer
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


def _param_type(kind: Any) -> type | None:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if args:  # Optional[float] and the like
        kind = args[0]
    return kind if kind in (int, float, bool, str) else None


def constructor(cls: type) -> dict[str, tuple[Any, Any]]:
    """The press's constructor arguments: name → (annotation, default or None). Read from the
    signature, so a press with its own ``__init__`` (CriticalKVPress) is described as it is called."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except (NameError, TypeError, AttributeError):  # an annotation that does not resolve: fall back to the raw ones
        hints = {}
    out = {}
    for name, p in inspect.signature(cls).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = (hints.get(name, p.annotation), None if p.default is p.empty else p.default)
    return out


def press_params(cls: type) -> tuple[Param, ...]:
    """lcbench parameters for a press: its simple public constructor arguments, and ``press`` (the
    name of the inner press class) for wrapper presses."""
    base = kvpress_module().BasePress
    out = []
    for name, (kind, default) in constructor(cls).items():
        if name.startswith("_") or name == "compression_ratio":
            continue
        if name == "press" or (isinstance(kind, type) and issubclass(kind, base)):
            out.append(Param(name, str, None, "inner press class name (e.g. SnapKVPress)"))
        elif _param_type(kind) is not None:
            out.append(Param(name, _param_type(kind), default, f"{cls.__name__}.{name}"))
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



def adopt(layer, keys: torch.Tensor, values: torch.Tensor, kept_keys: torch.Tensor, kept_values: torch.Tensor,
          name: str):
    """The layer holding what a press's ``compress`` returned: the slots whose keys it kept (true
    positions and all) with the *values it returned* — a press that folds evicted values into the
    kept ones (MergingPress) keeps its merged values. A press whose returned keys are not rows of
    the layer (re-rotated, merged, channel-pruned keys) is refused: its tokens have no position."""
    if kept_keys.shape[:2] != keys.shape[:2] or kept_values.shape != kept_keys.shape:
        raise UserError(f"{name} returned keys {tuple(kept_keys.shape)} and values {tuple(kept_values.shape)} for a "
                        f"cache of {tuple(keys.shape)}; the bridge maps one value per kept key. Fix: use an lcbench method.")
    if torch.equal(kept_keys, keys) and torch.equal(kept_values, values):
        return layer
    slots = returned_slots(keys, kept_keys)
    slots, order = slots.sort(dim=-1)
    if bool((slots[..., 1:] == slots[..., :-1]).any()):
        raise UserError(f"{name} returned the same cached token twice; the bridge keeps each slot once. "
                        f"Fix: use an lcbench method.")
    kept_values = kept_values.gather(2, order[..., None].expand_as(kept_values))
    layer.select(slots)
    _, held = layer.dense()
    if not torch.equal(held, kept_values):  # the press changed the values it kept (merging)
        if not isinstance(layer, DenseLayer):
            raise UserError(f"{name} changed the values it kept, which a {type(layer).__name__} cannot take. "
                            f"Fix: put the kvpress press first among the cache stages.")
        layer.values = kept_values.to(held.dtype).contiguous()
    return layer

class KvpressStage(Stage):
    """Base of the stage classes :func:`press_stage` makes, one per press class."""

    family = "kv_dropping"
    stages = ("cache",)
    token_budget = False  # a press is built with a compression ratio
    # reference: each layer reaches the press through the bridge (queries and keys un-rotated into a stand-in
    # hidden state, the cache cloned), so the time is the bridge's, not kvpress's own pipeline's
    reference_latency = True
    needs = Needs(queries=True)
    press_cls: ClassVar[type]

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self.press = self._build(self.press_cls, self.args)

    def _build(self, cls: type, args: dict[str, Any]):
        kwargs = {k: v for k, v in args.items() if v is not None}
        if "press" in constructor(cls):
            if "press" not in kwargs:
                raise UserError(f"{self.name} wraps another press: pass it, e.g. --method-args press=SnapKVPress.")
            inner_cls = press_class(kwargs["press"])
            refuse(inner_cls.__name__)
            kwargs["press"] = inner_cls(**({"compression_ratio": self.ratio} if _has_ratio(inner_cls) else {}))
        if _has_ratio(cls):
            kwargs["compression_ratio"] = self.ratio
        try:
            press = cls(**kwargs)
        except (AssertionError, TypeError, ValueError) as exc:
            raise UserError(f"{self.name} rejected its arguments {kwargs}: {exc}") from None
        if not _has_ratio(cls):  # a wrapper's ratio is a property that sets its inner press's
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
                # copies: a press may write into what it is given (ThinKPress zeroes key channels in place)
                kept_keys, kept_values = self.press.compress(module, hidden, keys.clone(), values.clone(), None, kwargs)
        except AssertionError as exc:
            raise UserError(f"{self.name} cannot compress this input: {exc or 'a kvpress assertion failed'}") from None
        masked = module.__dict__.get("masked_key_indices")
        if masked is not None:  # per-head masking (AdaKVPress): store what is not masked, ragged
            if not (torch.equal(kept_keys, keys) and torch.equal(kept_values, values)):
                raise UserError(f"{self.name} both masked keys per head and changed the cache; the bridge stores one "
                                f"or the other. Fix: use a press that does one.")
            keep = torch.ones(layer.positions.shape, dtype=torch.bool, device=keys.device)
            keep[masked] = False
            return RaggedLayer.from_layer(layer, keep)
        return adopt(layer, keys, values, kept_keys, kept_values, self.name)

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
    return "compression_ratio" in constructor(cls)


@functools.cache
def press_stage(class_name: str) -> type[Stage]:
    """The lcbench stage class for ``kvpress:<class_name>`` (made once per press class)."""
    cls = press_class(class_name)
    refuse(class_name)
    doc = (cls.__doc__ or "").strip().splitlines()
    return type(f"Kvpress{class_name}", (KvpressStage,), {
        "name": PREFIX + class_name,
        "summary": f"kvpress {class_name}: {doc[0] if doc else 'a kvpress press'}",
        "paper": f"NVIDIA kvpress (github.com/NVIDIA/kvpress), {cls.__module__}.{class_name}",
        "params": press_params(cls),
        "press_cls": cls,
        "__doc__": f"kvpress's {class_name} run by lcbench's engine (see lcbench.methods.kvpress_bridge).",
    })


# --- every press kvpress exports: native in lcbench, run by the bridge, or refused --------------
@dataclasses.dataclass(frozen=True)
class PressSupport:
    """How lcbench runs one kvpress press. ``native``: the lcbench ``method`` (with ``args``) keeps
    exactly the positions the press (built with ``press_kwargs``; a wrapper's inner press with
    ``inner``) keeps on a fixed input (tests/test_kvpress_presses.py; ThinK: the key channels it prunes),
    and ``reason``, when set, is why ``kvpress:<press>`` itself is refused; ``bridged``: ``kvpress:<press>``
    (with ``args``) runs it; ``refused``: ``kvpress:<press>`` stops with ``reason``."""

    press: str
    status: str  # native | bridged | refused
    method: str = ""
    args: str | None = None
    press_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    inner: dict[str, Any] = dataclasses.field(default_factory=dict)
    reason: str = ""
    exact: bool = True  # False: kept positions agree with kvpress's only up to float rounding (a note says how far)
    note: str = ""


def _native(press: str, method: str, args: str | None = None, inner: dict | None = None, **kwargs) -> PressSupport:
    return PressSupport(press, "native", method, args, kwargs, inner or {})


def _bridged(press: str, args: str | None = None, note: str = "") -> PressSupport:
    return PressSupport(press, "bridged", args=args, exact=not note, note=note)


def _refused(press: str, reason: str) -> PressSupport:
    return PressSupport(press, "refused", reason=reason)


DECODE = "acts while decoding (its own forward_hook on every generated token); the bridge runs prefill presses"
PRESSES: tuple[PressSupport, ...] = (
    _native("SnapKVPress", "snapkv", "window_size=16,kernel_size=5,pooling=avg", window_size=16, kernel_size=5),
    _native("StreamingLLMPress", "streamingllm", "n_sink=4", n_sink=4),
    _native("KnormPress", "knorm"),
    _native("TOVAPress", "tova"),
    _native("ExpectedAttentionPress", "expected_attention", "n_sink=4,n_future_positions=512", n_sink=4,
            n_future_positions=512),
    _native("PyramidKVPress", "pyramidkv", "window_size=8,kernel_size=5,beta=2", window_size=8, kernel_size=5, beta=2),
    _native("AdaKVPress", "adakv", "window_size=16,kernel_size=5", inner={"press": "SnapKVPress", "window_size": 16}),
    _native("KeyDiffPress", "keydiff"),
    _native("LagKVPress", "lagkv", "n_sink=4,lag_size=32", n_sink=4, lag_size=32),
    _native("CURPress", "cur"),
    _native("CriticalKVPress", "criticalkv", "window_size=16", inner={"press": "SnapKVPress", "window_size": 16}),
    _native("CriticalAdaKVPress", "criticaladakv", "window_size=16", inner={"press": "SnapKVPress", "window_size": 16}),
    _bridged("RandomPress", "seed=0"),
    _bridged("ChunkPress", "press=KnormPress,chunk_length=64"),
    _bridged("ChunkKVPress", "press=KnormPress,chunk_length=10"),
    _bridged("EntropyGatedChunkKVPress", "press=KnormPress"),
    _bridged("BlockPress", "press=KeyDiffPress,block_size=64"),
    _bridged("MergingPress", "press=KnormPress"),
    _bridged("CompactorPress", "chunk_size=64"),
    _bridged("LeverageScorePress", note="a Cholesky of a random sketch of pre-RoPE keys, which the bridge recovers by "
                                         "un-rotating the cached keys: on the fixed input ≥ 97% of kvpress's kept "
                                         "tokens per head, not all"),
    _bridged("NonCausalAttnPress", "chunk_size=64"),
    _bridged("CapPress"),
    _refused("BasePress", "the abstract base of every press: it compresses nothing"),
    _refused("ScorerPress", "the abstract base of scoring presses: it has no score"),
    _refused("ComposedPress", "takes a list of presses and runs them in its own forward_hook; compose lcbench "
                              "stages with a chain (a+b) instead"),
    _refused("PerLayerCompressionPress", "takes a list of per-layer ratios and sets them in its own forward_hook "
                                         "(flash attention only); lcbench's pyramidkv gives layers their own budgets"),
    _refused("KeyRerotationPress", "re-rotates the kept keys to the positions 0..K−1; lcbench keeps every token at its "
                                   "true position, so re-rotated keys have no slot to map to"),
    PressSupport("ThinKPress", "native", "think", "window_size=32", {"key_channel_compression_ratio": 0.5},
                 reason="prunes key channels by zeroing them in the dense cache (no byte is saved) and its ratio "
                        "cannot be set; lcbench's `think` prunes the same channels and stores fewer of them"),
    _refused("SimLayerKVPress", "its compression is decided per layer by lazy_threshold (a lazy layer keeps its sinks "
                                "and a recent window, any other layer everything), so no requested ratio can be "
                                "honoured, and its compression_ratio cannot be set; lcbench's native `simlayerkv` "
                                "runs it: `mode=threshold` keeps kvpress's exact positions, the default `mode=ratio` "
                                "marks the most lazy layers until --ratio is reached"),
    _refused("DuoAttentionPress", "needs hub artifacts (DuoAttention's head patterns for a few models) or extra "
                                  "model passes on random samples (on_the_fly_scoring) in post_init_from_model; "
                                  "lcbench's native `duoattention` runs it: its on-the-fly head scores are calibrated "
                                  "once per model, `mode=heads` keeps kvpress's exact positions, the default "
                                  "`mode=ratio` picks the streaming heads for --ratio, and `pattern=official` "
                                  "reads the trained patterns kvpress downloads (pinned commit)"),
    _refused("QFilterPress", "needs hub artifacts (nthngdy/<model>_qfilt); lcbench's `qfilters` estimates its "
                             "filters offline"),
    _refused("ExpectedAttentionStatsPress", "needs hub artifacts (query statistics per model) or a calibration "
                                            "pass over a hub dataset"),
    _refused("KVzapPress", "needs hub artifacts (a trained KVzap scorer model)"),
    _refused("FastKVzipPress", "needs hub artifacts (Fast-KVzip's trained gates)"),
    _refused("RestoreKVPress", "needs hub artifacts (restore embeddings and a LoRA adapter) and extra model passes"),
    _refused("LUKVPress", "needs downloaded artifacts (a per-model, per-scorer budget curve fetched by URL)"),
    _refused("KVzipPress", "needs extra model passes (the context is re-fed for reconstruction scoring), run from "
                           "its own __call__; lcbench's native `kvzip` runs those passes before the prefill and "
                           "keeps kvpress's exact positions"),
    _refused("KVgradPress", "needs extra forward and backward passes over the context, run from its own __call__"),
    _refused("KVComposePress", "compresses after the whole prefill, across layers, from its own __call__"),
    _refused("FinchPress", "needs a delimiter token between context and question in the input ids (its __call__ "
                           "hooks the embedding layer); lcbench's native `finch` runs it with --query-aware (the "
                           "question is the window) and keeps kvpress's exact positions on one chunk; "
                           "--prefill-chunk N --compress-chunks reads the context chunk by chunk, as the paper does"),
    _refused("ObservedAttentionPress", "needs the eager attention weights of every prefill query (output "
                                       "attentions), which lcbench's attention does not materialize; lcbench's "
                                       "`h2o` scores by the same accumulated attention"),
    _refused("DMSPress", "evicts by a score threshold, not a ratio, in its own forward_hook (also while decoding); "
                         "lcbench's native `dms` runs it: `mode=threshold` keeps kvpress's exact positions (with "
                         "`decoding=true` also while decoding), the default `mode=ratio` sets each layer's threshold "
                         "for --ratio"),
    _refused("DecodingPress", DECODE),
    _refused("CompressionRatioDecodingPress", DECODE),
    _refused("PrefillDecodingPress", "pairs a prefill press with a decoding press in its own forward_hook; " + DECODE),
    _refused("CAMPress", "merges values while decoding (a DecodingPress); " + DECODE),
)
SUPPORT: dict[str, PressSupport] = {p.press: p for p in PRESSES}


def refuse(class_name: str) -> None:
    """UserError for a press the bridge does not run, with its reason and what to use instead."""
    entry = SUPPORT.get(class_name)
    if entry is not None and entry.reason:
        raise UserError(f"kvpress:{class_name} is not run by lcbench's bridge: {entry.reason}. Fix: choose "
                        f"another press (`python -m lcbench.methods.kvpress_bridge` lists them) or an lcbench method.")


def markdown() -> str:
    """The README's table: one row per press kvpress exports."""
    kvpress = kvpress_module()
    exported = [n for n in kvpress.__all__ if isinstance(getattr(kvpress, n), type)
                and issubclass(getattr(kvpress, n), kvpress.BasePress)]
    lines = ["| kvpress press | in lcbench | how |", "|---|---|---|"]
    counts = {"native": 0, "bridged": 0, "refused": 0}
    for name in exported:
        entry = SUPPORT.get(name)
        if entry is None:
            lines.append(f"| {name} | **unclassified** | add it to `PRESSES` in lcbench/methods/kvpress_bridge.py |")
            continue
        counts[entry.status] += 1
        if entry.status == "native":
            kept = "pruned key channels" if entry.method == "think" else "positions"
            how = f"`--method {entry.method}` keeps kvpress's exact {kept}; " + (
                f"`kvpress:{name}` is refused: {entry.reason}" if entry.reason else f"`kvpress:{name}` runs too")
        elif entry.status == "bridged":
            how = f"`--method kvpress:{name}`" + (f" `--method-args {entry.args}`" if entry.args else "")
            how += f" (keeps what kvpress keeps up to float rounding: {entry.note})" if entry.note else ""
        else:
            how = entry.reason
        label = {"native": f"native (`{entry.method}`)", "bridged": "bridged", "refused": "**refused**"}[entry.status]
        lines.append(f"| {name} | {label} | {how} |")
    lines.append("")
    lines.append(f"Generated by `python -m lcbench.methods.kvpress_bridge --markdown` from kvpress {_version()}'s "
                 f"{len(exported)} exported press classes: {counts['native']} native, {counts['bridged']} bridged, "
                 f"{counts['refused']} refused. Native: checked to keep exactly kvpress's positions (per layer and KV "
                 f"head) on a fixed input; bridged: checked to keep what kvpress's own hook keeps (positions and "
                 f"values) on that input; refused: `kvpress:<press>` stops with the reason shown. Tests: "
                 f"tests/test_kvpress_presses.py.")
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import version

    return version("kvpress")


BEGIN, END = "<!-- kvpress:begin -->", "<!-- kvpress:end -->"


def write_readme(table: str, readme) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise UserError(f"{readme} has no {BEGIN} … {END} markers. Fix: add them where the table belongs.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m lcbench.methods.kvpress_bridge",
                                     description="Print (or write into README.md) how lcbench runs each kvpress press.")
    parser.add_argument("--markdown", action="store_true", help="write the table into README.md between the markers")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[2] / "README.md")
    args = parser.parse_args(argv)
    table = markdown()
    print(table)
    if args.markdown:
        write_readme(table, args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
