"""KV-cache methods side by side: compression time vs prefill time and KV bytes held vs full.

Every KV-dropping and KV-quantization method (and the chains ``snapkv+kivi``, ``pyramidkv+int8``,
and ``kvpress:SnapKVPress`` when kvpress is installed) compresses the same ~4K-token context
(Paul Graham essays from ../shared/data/niah) at ``--ratio`` through lcbench's engine, exactly as
a run does: one compressing prefill (the cache stage runs on each layer right after its
attention, and its time — observations included — is the compression time), then a one-token
answer of ``--decode-tokens`` tokens (EOS masked until then, so every method decodes as many).
Reported per method: the measured ratio, KV bytes held and their share of the full cache, the KV
bytes held when decoding ended (decode-time evictions lower them, appended tokens raise them), prefill
time, compression time, compression as % of prefill, and decode tokens/s with its ratio to
``full``'s (issue #14's target for ``kivi``/``int4``/``int8``: ≥ 0.7 × full at 4K on CPU). On a shared CPU the
timings move with the machine's load; the bytes do not.

    python benchmarks/methods.py                        # SmolLM2-135M-Instruct, 4K, ratio 0.5
    python benchmarks/methods.py --methods snapkv,kivi --context-tokens 2048
    python benchmarks/methods.py --methods full,h2o --variant dms=mode=threshold,threshold=-20,decoding=true
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lcbench.engine.runner import Engine, EngineConfig
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.methods.registry import builtin_methods
from lcbench.models.loading import load_model
from lcbench.tasks.sample import Sample, Turn

ESSAYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "niah" / "PaulGrahamEssays"
CHAINS = ["snapkv+kivi", "pyramidkv+int8"]


def essay_context(tokenizer, tokens: int) -> str:
    """The first ``tokens`` tokens of the essays (sorted by file name), as text."""
    ids: list[int] = []
    for path in sorted(ESSAYS.glob("*.txt")):
        ids += tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            break
    return tokenizer.decode(ids[:tokens])


def default_methods() -> list[str]:
    """Every built-in KV method: dropping and quantization, and the soft-compression methods that
    compress the cache itself (a cache stage: kvmerge, fourierkv, subgen; not the trained adapters)."""
    kv = {"kv_dropping": [], "kv_quantization": [], "soft_compression": []}
    for name, cls in sorted(builtin_methods().items()):
        family = getattr(cls, "family", None)
        if family in kv and (family != "soft_compression" or "cache" in cls.stages):
            kv[family].append(name)
    methods = ["full", *kv["kv_dropping"], *kv["kv_quantization"], *kv["soft_compression"], *CHAINS]
    try:
        import kvpress  # noqa: F401

        methods.append("kvpress:SnapKVPress")
    except ImportError:
        pass
    return methods


def measure(loaded, sample: Sample, method: str, ratio: float, method_args: str | None = None) -> dict:
    r = 0.0 if method == "full" else ratio
    chain = Chain.build(resolve_chain(method, method_args, r), r)
    # methods that pick the context for the question (finch, ilre, reform) run query-aware, as they must
    query_aware = any(stage.needs_question for stage in chain.stages)
    engine = Engine(loaded.model, loaded.tokenizer, chain, EngineConfig(check_ratio=False, query_aware=query_aware))
    start = time.perf_counter()
    rec = engine.run(sample, multi_turn=False)[0].flat()  # the record's flat view, plus the wall time
    rec["wall_s"] = time.perf_counter() - start
    return rec


def row(method: str, rec: dict, full_tok_s: float | None) -> list[str]:
    share = rec["kv_bytes"] / rec["kv_bytes_full"]
    tok_s = rec.get("decode_tok_s") or 0.0
    vs_full = f"{tok_s / full_tok_s:.2f}" if full_tok_s else "–"
    end = rec.get("kv_bytes_end")
    return [method, f"{rec['achieved_ratio']:.3f}", f"{rec['kept_tokens']:.0f}", f"{rec['kv_bytes'] / 2**20:.1f}",
            f"{100 * share:.1f}%", "–" if end is None else f"{end / 2**20:.1f}", f"{rec['prefill_s']:.2f}", f"{rec['compress_s']:.2f}",
            f"{100 * rec['compress_s'] / rec['prefill_s']:.1f}%", f"{tok_s:.2f}", vs_full]


HEADER = ["method", "ratio", "kept tok", "KV MB", "KV vs full", "KV MB at end", "prefill s", "compress s", "compress/prefill",
          "decode tok/s", "decode vs full"]


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(HEADER, widths)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def decode_step_table(model, methods: list[str], ratio: float, length: int, steps: int = 64, rounds: int = 5) -> None:
    """The cache's share of a decode step, side by side: every layer kind a method leaves (built
    by the method's own cache stage from random keys/values of the model's layer shape and
    ``length`` tokens) appends ``steps`` tokens one at a time and hands attention its dense view,
    in interleaved rounds (so machine load hits every method alike); the median ms per step and
    layer, and its ratio to ``full``'s."""
    import statistics

    from lcbench.cache.layer import DenseLayer
    from lcbench.methods.base import LayerObservation

    cfg = model.config
    heads = cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(1, heads, length, dim, generator=gen, dtype=model.dtype) for _ in range(2))
    seen = LayerObservation(layer_idx=0, num_layers=1, num_groups=cfg.num_attention_heads // heads,
                            context_length=length, protected=0)

    def build(method: str):
        layer = DenseLayer()
        layer.append(keys, values, torch.arange(length)[None], None)
        if method != "full":
            for stage in Chain.build(resolve_chain(method, None, ratio), ratio).stages:
                stage.begin_sample()
                layer = stage.compress_layer(layer, seen)
        return layer

    times = {m: [] for m in methods}
    new = [(torch.randn(1, heads, 1, dim, generator=gen, dtype=model.dtype),
            torch.randn(1, heads, 1, dim, generator=gen, dtype=model.dtype)) for _ in range(steps)]
    for _ in range(rounds):
        for method in methods:
            layer = build(method)
            start = time.perf_counter()
            for t, (k, v) in enumerate(new):
                layer.append(k, v, torch.tensor([[length + t]]), None)
                layer.dense()
            times[method].append((time.perf_counter() - start) / steps * 1000)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"\ncache append + dense view per decode step and layer ({heads} KV heads × {dim}, {length} tokens, "
          f"{model.dtype}), median of {rounds} interleaved rounds of {steps} steps\n")
    print("| method | ms per step and layer | full ÷ method |")
    print("|---|---:|---:|")
    for m in methods:
        print(f"| {m} | {med[m]:.3f} | {med.get('full', med[m]) / med[m]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--context-tokens", type=int, default=4096 - 40, help="context tokens before the chat template")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--methods", default=None, help="comma-separated (default: all KV methods and chains)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens each method decodes (EOS masked until then)")
    parser.add_argument("--steps-only", action="store_true", help="only the side-by-side cache-step table")
    parser.add_argument("--variant", action="append", default=[], metavar="METHOD=ARGS",
                        help="one more row: METHOD with its k=v,... arguments (e.g. "
                             "dms=mode=threshold,threshold=-20,decoding=true); repeatable")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, {}, "cpu")
    if args.steps_only:
        decode_step_table(loaded.model, (args.methods or "full,kivi,int4,int8").split(","), args.ratio, args.context_tokens)
        return
    sample = Sample("essays", essay_context(loaded.tokenizer, args.context_tokens),
                    [Turn(question="What is the main point of the text?", answers=[""], max_new_tokens=args.decode_tokens,
                          scorer="none", min_new_tokens=args.decode_tokens)])
    methods = args.methods.split(",") if args.methods else default_methods()
    variants = [tuple(v.split("=", 1)) for v in args.variant]
    print(f"model {args.model} ({loaded.model.dtype}, CPU, {args.threads} threads), ratio {args.ratio}", flush=True)
    rows = []
    full_tok_s = None
    for method in methods:
        rec = measure(loaded, sample, method, args.ratio)
        if method == "full":
            full_tok_s = rec.get("decode_tok_s")
        rows.append(row(method, rec, full_tok_s))
        print("  " + "  ".join(rows[-1]), flush=True)
    for method, method_args in variants:
        rec = measure(loaded, sample, method, args.ratio, method_args)
        rows.append(row(f"{method} ({method_args})", rec, full_tok_s))
        print("  " + "  ".join(rows[-1]), flush=True)
    print(f"\ncontext: {rec['context_tokens']} tokens; full KV cache {rec['kv_bytes_full'] / 2**20:.1f} MB\n")
    print_table(rows)
    quantized = [m for m in methods if m in ("full", "kivi", "int4", "int8")]
    if "full" in quantized and len(quantized) > 1:
        decode_step_table(loaded.model, quantized, args.ratio, rec["context_tokens"])


if __name__ == "__main__":
    main()
