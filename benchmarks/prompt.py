"""Prompt compressors side by side: compression time, achieved ratio and tokens kept.

Every text-stage method (family ``prompt_compression``) compresses the same context at
``--ratio`` through its ``compress_text`` hook, as the engine's text stage calls it, with the
question visible (``--query-aware``, so the question-aware methods run too) and the target model
as the compressor LM. The default target is lcbench's tiny random Llama (no download, seconds on a
CPU: the timings show the methods' own overhead — the number of compressor forwards they make — not
a real model's cost); ``--model smollm2-135m-instruct`` or any registered/hub model measures a real
one. The context is the first ``--context-chars`` characters of the Paul Graham essays in
../shared/data/niah with a needle sentence in the middle (``--input prose``) or synthetic Python
source of small functions (``--input code``, LongCodeZip's setting). A method that cannot run here
(``llmlingua2`` without its classifier) is listed with its refusal. On a shared CPU the timings move
with the machine's load; the token counts do not.

    python benchmarks/prompt.py                         # tiny random Llama, ratio 0.5, prose
    python benchmarks/prompt.py --input code --ratio 0.75
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lcbench.engine.attach import use_lcbench_attention
from lcbench.errors import UserError
from lcbench.methods.base import TextInput
from lcbench.methods.registry import METHODS, builtin_methods
from lcbench.models.loading import load_model

ESSAYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "niah" / "PaulGrahamEssays"
NEEDLE = "The special magic number for Lisbon is 7421. "
QUESTION = "What is the special magic number for Lisbon?"
CODE_QUESTION = "Complete the function that adds func_3 to the value of a Box."


def prose(chars: int) -> str:
    text = "".join(p.read_text() for p in sorted(ESSAYS.glob("*.txt")))[:chars]
    cut = text.index(". ", len(text) // 2) + 2
    return text[:cut] + NEEDLE + text[cut:]


def code(functions: int) -> str:
    parts = ["import math\n\n"]
    for i in range(functions):
        body = "".join(f"    x{j} = x{j - 1} * {i + j} + {j}\n" for j in range(1, 3 + 2 * (i % 4)))
        parts.append(f"def func_{i}(a, b):\n    # helper number {i}\n    x0 = a + {i}\n{body}"
                     f"    if b > {i}:\n        x0 = x0 - b\n    return x0\n\n")
    return "".join(parts) + "class Box:\n    def __init__(self, v):\n        self.v = v\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--input", choices=("prose", "code"), default="prose")
    parser.add_argument("--context-chars", type=int, default=6000, help="prose: characters of essays")
    parser.add_argument("--functions", type=int, default=24, help="code: number of functions")
    parser.add_argument("--methods", default=None, help="comma-separated (default: every prompt compressor)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, {}, "cpu")
    use_lcbench_attention(loaded.model)
    context, question = (prose(args.context_chars), QUESTION) if args.input == "prose" else (code(args.functions), CODE_QUESTION)
    names = args.methods.split(",") if args.methods else sorted(
        n for n, cls in builtin_methods().items() if getattr(cls, "family", None) == "prompt_compression")
    print(f"model {args.model} (CPU, {args.threads} threads), ratio {args.ratio}, input {args.input}, question visible\n")
    print("| method | compression s | achieved ratio | tokens kept / original |")
    print("|---|---:|---:|---:|")
    for name in names:
        stage = METHODS.get(name)(ratio=args.ratio)
        stage.begin_sample()
        text = TextInput(context, [question], loaded.tokenizer, True, model=loaded.model)
        start = time.perf_counter()
        try:
            stage.compress_text(text)
        except UserError as exc:
            print(f"| {name} | refused: {str(exc).split('.')[0]} | | |")
            continue
        seconds = time.perf_counter() - start
        s = stage.sample_stats()
        print(f"| {name} | {seconds:.2f} | {s['text_ratio']:.3f} | {s['text_tokens_kept']} / {s['text_tokens_original']} |",
              flush=True)


if __name__ == "__main__":
    main()
