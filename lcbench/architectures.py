"""The supported-architecture matrix: every decoder family of :mod:`lcbench.models.families`, run
through lcbench on CPU, right or refused.

For each family a tiny random model (sliding windows far smaller than the ~250-token context) is

1. switched to lcbench's attention — which probes it (:func:`lcbench.models.hook.probe`) and
   raises :class:`UserError` for an architecture lcbench cannot take over: the family is
   *refused*, with that reason;
2. run with ``full`` and compared with ``model.generate`` (greedy), with lcbench's dense
   attention as SDPA and as eager — each against transformers' own implementation of the same
   name (where transformers has no SDPA path for the family, softcap or sinks, both are compared
   with eager);
3. run with one method of each family (:data:`METHODS`), which must reach the ratio it was asked
   for (the engine's check) — or say clearly why it cannot on this architecture.

``python -m lcbench.architectures --markdown`` runs the matrix and writes the table between the
``<!-- architectures:begin -->`` / ``<!-- architectures:end -->`` markers of README.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import REPO_ROOT
from .errors import CompressionShortfall, UserError
from .models.families import FAMILIES, WINDOW, Family, build, tiny_config
from .models.hook import config_refusal

# one method of each family, with settings that fit a ~250-token context and a 24-token window
METHODS: tuple[tuple[str, str | None], ...] = (
    ("snapkv", "window_size=8"),
    ("streamingllm", None),
    ("kivi", "group_size=8"),
    ("ashape", "block_size=8,sink_tokens=8"),
    ("truncate", None),
)
RATIO = 0.5
NEW_TOKENS = 8

@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass
class FamilyResult:
    family: Family
    status: str = "works"  # works | refused | FAILS
    reason: str = ""
    geometry: str = ""
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0


def sample():
    """The matrix's sample: a ~250-token context and two questions of different lengths (one
    batch: the shorter one is left-padded)."""
    from .tasks.sample import Sample, Turn

    filler = "The quick brown fox jumps over the lazy dog. A needle hides in a haystack of essays. "
    turns = [Turn(question="\n\nQuestion: What is the special magic number? Answer:", answers=["7421"],
                  max_new_tokens=NEW_TOKENS, scorer="passkey"),
             Turn(question="\n\nWhat is the best thing to do in San Francisco?", answers=["sandwich"],
                  max_new_tokens=NEW_TOKENS, scorer="passkey")]
    return Sample("arch", "Read the following text carefully. " + filler * 12, turns)


def _generate(model, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids):].tolist()


def _text(tok, ids: list[int]) -> str:
    eos = tok.eos_token_id
    ids = ids[: ids.index(eos)] if eos in ids else ids
    return tok.decode(ids, skip_special_tokens=True)


def references(fam: Family, prompts: list[list[int]]) -> dict[str, list[list[int]]]:
    """``model.generate`` tokens per prompt, for each attention implementation transformers offers."""
    refs = {}
    for impl in ("sdpa", "eager"):
        try:
            model = build(fam, impl)
            refs[impl] = [_generate(model, p) for p in prompts]
        except ValueError:  # transformers has no such path for this family (softcap, sinks)
            continue
    return refs


def lcbench_model(fam: Family, dense: str):
    """The family's tiny model (same weights as :func:`references`) on lcbench's attention."""
    from .engine.attach import use_lcbench_attention

    model = build(fam, "eager")
    use_lcbench_attention(model, dense)
    return model


def run_method(model, tok, method: str, args: str | None, ratio: float):
    from .engine.runner import Engine
    from .methods.chain import Chain, resolve_chain

    engine = Engine(model, tok, Chain.build(resolve_chain(method, args, ratio)))
    return engine.run(sample(), False)


def check_family(fam: Family, methods=METHODS) -> FamilyResult:
    """Run the matrix row of one family."""
    from .engine.prompt import render
    from .models.hook import geometry
    from .models.tiny import tiny_tokenizer

    start = time.perf_counter()
    result = FamilyResult(fam)
    tok = tiny_tokenizer()
    s = sample()
    p = render(tok, s, s.context, multi_turn=False)
    prompts = [p.context_ids + t for t in p.turn_ids]
    try:
        reason = config_refusal(tiny_config(fam))  # what load_model says before fetching weights
        if reason:
            raise UserError(reason)
        model = lcbench_model(fam, "sdpa")
    except UserError as exc:
        result.status, result.reason = "refused", str(exc)
        result.seconds = time.perf_counter() - start
        return result
    result.geometry = geometry(model).describe()
    refs = references(fam, prompts)
    for dense in ("sdpa", "eager"):
        impl = dense if dense in refs else "eager"
        m = model if dense == "sdpa" else lcbench_model(fam, dense)
        want = [_text(tok, r) for r in refs[impl]]
        got = [r["prediction"] for r in run_method(m, tok, "full", None, 0.0)]
        note = "" if impl == dense else " (transformers has no sdpa path: vs eager)"
        result.checks.append(Check(f"full/{dense}", got == want,
                                   note if got == want else f"{got} != generate {want}{note}"))
    for method, args in methods:
        try:
            records = run_method(model, tok, method, args, RATIO)
        except CompressionShortfall as exc:
            result.checks.append(Check(method, True, "shortfall: " + str(exc).split(":")[0]))
            continue
        except UserError as exc:  # a clear refusal, before anything ran
            result.checks.append(Check(method, True, "refused: " + str(exc).split(":")[0]))
            continue
        except Exception as exc:  # noqa: BLE001 - the matrix reports every crash
            result.checks.append(Check(method, False, f"crash: {type(exc).__name__}: {exc}"))
            continue
        r = records[0]
        shrunk = r.get("attention_density") if method == "ashape" else r["achieved_ratio"]
        if method == "ashape":
            ok = 1.0 - shrunk >= RATIO - 0.05
            detail = f"density {shrunk:.2f}"
        else:
            ok = r["achieved_ratio"] >= RATIO - 0.05 and r["kv_bytes"] < r["kv_bytes_full"]
            detail = f"ratio {r['achieved_ratio']:.2f}"
        result.checks.append(Check(method, ok, detail))
    if not all(c.ok for c in result.checks):
        result.status = "FAILS"
    result.seconds = time.perf_counter() - start
    return result


def run_matrix(names: list[str] | None = None) -> list[FamilyResult]:
    fams = [f for f in FAMILIES if f.available() and (not names or f.name in names)]
    return [check_family(f) for f in fams]


def _cell(check: Check) -> str:
    if not check.ok:
        return "✗ " + check.detail[:60]
    if check.detail.startswith("shortfall"):
        return "shortfall (clear error)"
    if check.detail.startswith("refused"):
        return "refused (clear error)"
    return "✓ " + check.detail if check.detail and not check.detail.startswith(" (") else "✓"


def markdown(results: list[FamilyResult]) -> str:
    """The README table: one row per family."""
    cols = ["full/sdpa", "full/eager"] + [m for m, _ in METHODS]
    lines = [f"| family | features | status | {' | '.join(cols)} |", "|" + "---|" * (len(cols) + 3)]
    for r in results:
        if r.status == "refused":
            reason = re.sub(r"\s+", " ", r.reason).split(". ")[0].split(", so ")[0].replace("|", "/")
            lines.append(f"| {r.family.name} | {r.family.features} | **refused**: {reason} |"
                         + " |" * len(cols))
            continue
        cells = {c.what: _cell(c) for c in r.checks}
        shape = ", ".join(part for part in r.geometry.split(", ") if not part.endswith(" layers"))
        feats = "; ".join(x for x in (r.family.features, shape) if x)
        lines.append(f"| {r.family.name} | {feats} | {r.status} | " + " | ".join(cells.get(c, "") for c in cols) + " |")
    import transformers

    lines.append("")
    lines.append(f"Generated by `python -m lcbench.architectures --markdown` (transformers {transformers.__version__}, "
                 f"torch {torch.__version__}, CPU, float32): tiny random models, ~250-token context, sliding "
                 f"windows of {WINDOW} tokens, 2 questions decoded as one batch, ratio {RATIO}. ✓ full: same "
                 f"greedy output as `model.generate`; ✓ method: reached the ratio (KV memory, or attention density "
                 f"for ashape); shortfall: the engine stops the run with a clear error because the method cannot "
                 f"reach the ratio on that architecture (e.g. a prompt compressor cannot shrink layers whose "
                 f"window is shorter than the compressed context); refused: the engine refuses the method before "
                 f"anything runs (e.g. a sparse method that computes attention itself without a model's "
                 f"attention softcap or learned sinks, such as a plugin that does not declare them).")
    return "\n".join(lines)


BEGIN, END = "<!-- architectures:begin -->", "<!-- architectures:end -->"


def write_readme(table: str, readme: Path) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise UserError(f"{readme} has no {BEGIN} … {END} markers. Fix: add them where the table belongs.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lcbench.architectures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="write the table into README.md between the markers")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    parser.add_argument("families", nargs="*", help="only these families")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    results = run_matrix(args.families or None)
    for r in results:
        bad = [f"{c.what}: {c.detail}" for c in r.checks if not c.ok]
        print(f"{r.family.name:14s} {r.status:8s} {r.seconds:5.1f}s {r.reason[:100] if r.reason else '; '.join(bad)}")
    table = markdown(results)
    if args.markdown:
        write_readme(table, args.readme)
        print(f"wrote the table into {args.readme}")
    else:
        print(table)
    return 1 if any(r.status == "FAILS" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
