"""lcbench against NVIDIA kvpress's own pipeline: same model, same token ids, same press, same
ratio; wall time for N = 1, 3, 8 questions on one context, side by side in one run.

kvpress (``KVPressTextGenerationPipeline._forward``): prefill the context with the press hooked
on every attention layer, then for each question in turn prefill it, decode greedily, and crop
the answer off the cache. lcbench (``Engine.run``): prefill and compress once, then all the
questions as one batch, each row leaving it when it ends (engine/decode.py). Both sides decode until EOS or ``--new-tokens``; the table shows the
tokens each decoded, so the work is the same. lcbench runs the press itself through its kvpress
bridge (``kvpress:SnapKVPress``) and, as a second column, its own ``snapkv`` with kvpress's
settings (tests/test_kvpress.py checks it keeps the same positions). The ``bound`` column is
kvpress's time ÷ lcbench snapkv's prefill + compression: the ratio lcbench would reach if decoding
(question prefills and every generated token) cost nothing.

kvpress 0.5 targets transformers < 5.3: under 5.24 an attention module receives its cache as
``cache`` (was ``past_key_values``) and no ``cache_position``; :func:`kvpress_compat` adds both
to the hook's keyword arguments while the benchmark runs — nothing else of kvpress is changed.
Needs kvpress: ``pip install --no-deps kvpress==0.5.5`` (it pins transformers<5.3) and
``pip install 'lcbench[kvpress]'`` (what it imports). Each side runs once untimed (warm-up) before
the timed repeats.

    python benchmarks/vs_kvpress.py [--context-tokens 2000] [--new-tokens 32] [--ratio 0.5]
"""

from __future__ import annotations

import contextlib
import statistics

import torch

from lcbench.engine.prompt import render
from lcbench.engine.runner import Engine, EngineConfig
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.models.loading import load_model
from lcbench.engine.attach import use_lcbench_attention

try:  # the sample, options and timer of the overhead benchmark
    from overhead import make_sample, parse_args, timed
except ImportError:  # imported as benchmarks.vs_kvpress
    from benchmarks.overhead import make_sample, parse_args, timed


@contextlib.contextmanager
def kvpress_compat():
    """kvpress 0.5's forward hook under transformers ≥ 5.3: pass it ``past_key_values`` and
    ``cache_position`` (the positions of this pass's tokens), which 5.24 no longer gives modules."""
    from kvpress.presses.base_press import BasePress

    original = BasePress.forward_hook

    def hook(self, module, args, kwargs, output):
        if "past_key_values" not in kwargs:
            cache = kwargs["cache"]
            q = kwargs["hidden_states"].shape[1]
            past = cache.get_seq_length(module.layer_idx) - q
            kwargs = {**kwargs, "past_key_values": cache,
                      "cache_position": torch.arange(past, past + q, device=kwargs["hidden_states"].device)}
        return original(self, module, args, kwargs, output)

    BasePress.forward_hook = hook
    try:
        yield
    finally:
        BasePress.forward_hook = original


def main() -> None:
    args = parse_args(__doc__, ratio=(float, 0.5), questions=(str, "1,3,8"))
    try:
        import kvpress
        from transformers import pipeline
    except ImportError:
        raise SystemExit("kvpress is not installed (this benchmark needs it): pip install --no-deps kvpress==0.5.5 "
                         "&& pip install 'lcbench[kvpress]'")

    loaded = load_model(args.model, {}, args.device)
    model, tok = loaded.model, loaded.tokenizer
    window, kernel = 64, 5  # kvpress SnapKVPress defaults
    press = kvpress.SnapKVPress(compression_ratio=args.ratio, window_size=window, kernel_size=kernel)
    engines = {
        "lcbench kvpress:SnapKVPress": Engine(model, tok, Chain.build(resolve_chain(
            "kvpress:SnapKVPress", f"window_size={window},kernel_size={kernel}", args.ratio)), EngineConfig(decode_rows=8)),
        "lcbench snapkv": Engine(model, tok, Chain.build(resolve_chain(
            "snapkv", f"window_size={window},kernel_size={kernel},pooling=avg", args.ratio)), EngineConfig(decode_rows=8)),
    }
    model.set_attn_implementation("sdpa")
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device=model.device)
    use_lcbench_attention(model)

    rows = []
    step = None  # seconds of one decode step with one row: measured at 1 question (first in --questions)
    for n in [int(x) for x in args.questions.split(",")]:
        sample = make_sample(tok, args.context_tokens, n, args.new_tokens)
        p = render(tok, sample, sample.context, False)
        inputs = {"context_ids": torch.tensor([p.context_ids]), "questions_ids": [torch.tensor([q]) for q in p.turn_ids]}
        times = {k: [] for k in ["kvpress", *engines]}
        context = []  # lcbench snapkv's prefill + compression: its time if decoding cost nothing
        floor = []  # ... plus its question prefill and its longest answer at one row's step cost
        out = {}
        for repeat in range(args.repeats + 1):  # repeat 0 warms both sides up and is not timed
            model.set_attn_implementation("sdpa")
            calls = []  # kvpress prefills the context with model.model: each model() call yields one token
            hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
            with kvpress_compat():
                t, _ = timed(lambda: pipe._forward(inputs, max_new_tokens=args.new_tokens, press=press))
            hook.remove()
            if repeat:
                times["kvpress"].append(t)
            out["kvpress"] = len(calls)
            use_lcbench_attention(model)
            for name, engine in engines.items():
                t, records = timed(lambda: engine.run(sample, False))
                if repeat:
                    times[name].append(t)
                    if name == "lcbench snapkv":
                        context.append(records[0]["prefill_s"] + records[0]["compress_s"])
                        longest = max(r["decode_tokens"] for r in records)
                        if n == 1 and longest:
                            step = records[0]["decode_s"] / longest  # one row's decode step, this context
                        if step is not None:
                            floor.append(context[-1] + records[0]["question_prefill_s"] + longest * step)
                out[name] = sum(r["decode_tokens"] + (r["stopped_by"] == "eos") for r in records)  # EOS too
        med = {k: statistics.median(v) for k, v in times.items()}
        med["context"] = statistics.median(context)
        med["floor"] = statistics.median(floor) if floor else None
        rows.append((n, med, out))

    print(f"\nmodel {args.model} on {args.device} ({torch.get_num_threads()} threads), context "
          f"{len(p.context_ids)} tokens, SnapKV ratio {args.ratio}, ≤ {args.new_tokens} new tokens, median of "
          f"{args.repeats}\n")
    names = list(engines)
    print("| questions | kvpress s | " + " | ".join(f"{n} s" for n in names)
          + " | kvpress ÷ lcbench (bridge) | kvpress ÷ lcbench (snapkv) | target | bound | floor bound | tokens kvpress / bridge / snapkv |")
    print("|---:|---:|" + "---:|" * len(names) + "---:|---:|---|---:|---:|---|")
    for n, med, out in rows:
        speed = [med["kvpress"] / med[name] for name in names]
        target = "≥ 1.2" if n == 1 else ("≥ 3" if n >= 8 else "≥ 1.5")  # issue #14
        print(f"| {n} | {med['kvpress']:.3f} | " + " | ".join(f"{med[name]:.3f}" for name in names)
              + f" | {speed[0]:.2f} | {speed[1]:.2f} | {target} | {med['kvpress'] / med['context']:.2f} "
              f"| {'—' if med['floor'] is None else format(med['kvpress'] / med['floor'], '.2f')} "
              f"| {out['kvpress']} / {out[names[0]]} / {out[names[1]]} |")
    print("\nbound: kvpress s ÷ lcbench snapkv's prefill + compression s — the ratio lcbench would reach if its "
          "decoding (question prefills and every generated token) cost nothing; a target above it cannot be met "
          "by decoding faster.\nfloor bound: kvpress s ÷ (lcbench snapkv's prefill + compression + question prefill "
          "+ its longest answer × one row's decode step, measured at 1 question) — the ratio if every batched step "
          "cost what a one-row step costs (a step of more rows reads the same weights and computes more, so it "
          "cannot cost less); a target above it cannot be met without a faster decode step than plain transformers'.")


if __name__ == "__main__":
    main()
