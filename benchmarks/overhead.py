"""The engine's overhead over plain transformers, full cache, same prompt and same tokens.

Two cases, measured side by side in one run (median of ``--repeats``, the cases interleaved):

1. one question: ``Engine.run`` (render, prefill the context, prefill the question, greedy
   decode, records) ÷ the *floor*: one plain-transformers prefill of the same ids (SDPA,
   ``DynamicCache``) and a greedy loop feeding the same tokens lcbench decoded. Target ≤ 1.05.
2. ``--questions`` questions on one context: ``Engine.run`` (the context prefilled once, the
   turns decoded as one batch) ÷ ``--questions`` separate ``model.generate`` calls (each prefills
   context + question). Target ≤ 0.5.

    python benchmarks/overhead.py [--context-tokens 2000] [--new-tokens 32] [--questions 8] [--device cpu]

Defaults to the offline SmolLM2-135M-Instruct; ``--model`` takes any causal LM.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lcbench.engine.prompt import render
from lcbench.engine.runner import Engine, EngineConfig
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.models.loading import DEFAULT_MODEL, load_model
from lcbench.engine.attach import use_lcbench_attention
from lcbench.tasks.sample import Sample, Turn

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
QUESTIONS = ["What is the pass key?", "Which colour is the sky?", "Which colour is the grass?",
             "Repeat the first sentence.", "What is yellow?", "Where do we go?", "Summarize the text.",
             "What number was mentioned?", "Name one colour.", "What comes back again?"]


def make_sample(tokenizer, context_tokens: int, questions: int, new_tokens: int) -> Sample:
    """A passkey context of about ``context_tokens`` tokens and ``questions`` different questions."""
    unit = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    half = FILLER * max(1, context_tokens // (2 * unit))
    context = half + "The pass key is 71432. Remember it. " + half
    turns = [Turn(question=f"\n\nQuestion: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:", answers=["71432"],
                  max_new_tokens=new_tokens, scorer="x") for i in range(questions)]
    return Sample(f"overhead-{questions}", context, turns, chat=True)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def floor_run(model, ids: list[int], tokens: list[int]) -> None:
    """Plain transformers: one prefill of ``ids`` and a greedy loop over the same ``tokens``."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        out.logits[:, -1].argmax(-1)
        for t in tokens[:-1]:
            out = model(input_ids=torch.tensor([[t]], device=device), past_key_values=cache, use_cache=True)
            out.logits[:, -1].argmax(-1)


def generate_each(model, prompts: list[list[int]], new_tokens: int) -> None:
    device = next(model.parameters()).device
    for ids in prompts:
        with torch.inference_mode():
            model.generate(torch.tensor([ids], device=device), max_new_tokens=new_tokens, do_sample=False)


def parse_args(doc: str, **extra) -> argparse.Namespace:
    """The options both timing benchmarks take (``extra``: name → (type, default)); loads nothing."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--context-tokens", type=int, default=2000)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    for name, (kind, default) in extra.items():
        ap.add_argument(f"--{name}", type=kind, default=default)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = parse_args(__doc__, questions=(int, 8))
    loaded = load_model(args.model, {}, args.device)
    model, tok = loaded.model, loaded.tokenizer
    engine = Engine(model, tok, Chain.build(resolve_chain("full", None, 0.0)), EngineConfig(decode_rows=args.questions))
    one = make_sample(tok, args.context_tokens, 1, args.new_tokens)
    many = make_sample(tok, args.context_tokens, args.questions, args.new_tokens)
    p1 = render(tok, one, one.context, False)
    pm = render(tok, many, many.context, False)
    ids1 = p1.context_ids + p1.turn_ids[0]
    record = engine.run(one, False)[0]
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():  # the tokens lcbench decodes (identical with a full cache: tests/test_engine_identity.py)
        out = model.generate(torch.tensor([ids1], device=model.device), max_new_tokens=args.new_tokens, do_sample=False)
    tokens1 = out[0, len(ids1):].tolist()
    use_lcbench_attention(model)
    assert record["decode_tokens"] == len([t for t in tokens1 if t not in engine.eos]), "lcbench decoded other tokens"
    times = {k: [] for k in ("lcb1", "floor1", "lcbN", "genN", "floorN")}
    for _ in range(args.repeats):
        times["lcb1"].append(timed(lambda: engine.run(one, False))[0])
        model.set_attn_implementation("sdpa")
        times["floor1"].append(timed(lambda: floor_run(model, ids1, tokens1))[0])
        times["genN"].append(timed(lambda: generate_each(
            model, [pm.context_ids + q for q in pm.turn_ids], args.new_tokens))[0])
        times["floorN"].append(timed(lambda: [floor_run(model, pm.context_ids + q, tokens1) for q in pm.turn_ids])[0])
        use_lcbench_attention(model)
        times["lcbN"].append(timed(lambda: engine.run(many, False))[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    n = args.questions
    print(f"\nmodel {args.model} on {args.device} ({torch.get_num_threads()} threads), context {len(p1.context_ids)} "
          f"tokens, {len(tokens1)} new tokens, median of {args.repeats}\n")
    print("| case | lcbench s | reference s | ratio | target | met |")
    print("|---|---:|---:|---:|---:|---|")
    r1 = med["lcb1"] / med["floor1"]
    print(f"| 1 question vs floor (prefill + greedy loop) | {med['lcb1']:.3f} | {med['floor1']:.3f} | {r1:.3f} | ≤ 1.05 | {'yes' if r1 <= 1.05 else 'NO'} |")
    rn = med["lcbN"] / med["genN"]
    print(f"| {n} questions vs {n} × model.generate | {med['lcbN']:.3f} | {med['genN']:.3f} | {rn:.3f} | ≤ 0.5 | {'yes' if rn <= 0.5 else 'NO'} |")
    rf = med["lcbN"] / med["floorN"]
    print(f"| {n} questions vs {n} × floor | {med['lcbN']:.3f} | {med['floorN']:.3f} | {rf:.3f} | – | |")
    print("\nall timings (s):", {k: [round(x, 3) for x in v] for k, v in times.items()})


if __name__ == "__main__":
    main()
