"""Needle in a haystack (gkamradt/LLMTest_NeedleInAHaystack@7b90d28; shared/specs/suites.md §3).

Grid: context length × depth. The haystack (upstream's 49 Paul Graham essays by default — from the
local data folder, lcbench's cache or a download of the pinned commit, :mod:`.essays` — read sorted,
where upstream globs in filesystem order; or lcbench's filler, labelled ``haystack=filler`` and
``niah[filler]``, when asked for or when the essays cannot be had) is repeated until long enough, cut to the length
in the *target* tokenizer, shortened by the 200-token buffer, and the needle is inserted at the
depth, moved back to just after a sentence end, as upstream. Upstream's sentence end is the token
that ``encode('.')`` gives; lcbench also accepts any token whose text ends with '.', which is the
same for byte-level BPE and makes SentencePiece tokenizers (where a lone '.' encodes as '▁.') work.

Prompt: the system message, then the context and the question
(``"{question} Don't give information outside the document or repeat your findings"``). Upstream's
OpenAI provider (``providers/openai.py``) sends them as two user messages (``messages=two``);
its Anthropic prompt (``providers/Anthropic_prompt.txt``) joins them with a blank line, which is
lcbench's default (``messages=one``: one user message, as every recorded lcbench run used; a
labelled deviation from the OpenAI layout; ``two`` falls back to one, warned, when the chat
template rejects consecutive user messages). A chat template without a system role (Gemma-1/2,
Mistral-7B-Instruct v0.x) gets the system prompt at the head of the context's user message
(:func:`system_folded`).

Scoring deviates from upstream, which uses an LLM judge (gpt-3.5-turbo, 1–10) that is not
available offline: ``score`` is the fraction of the needle's content words found in the
normalized answer (1.0 for a full match); ``score_10`` maps it onto the judge's 1–10 scale. For the
passkey needle the score is exact containment of the key. Both are labelled as lcbench deviations.
"""

from __future__ import annotations

import random
import re
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..chat import accepts_system, chat_text
from .. import protocol_file
from ..errors import UserError
from . import essays
from ..params import Param
from .base import Task, TaskEnv
from .sample import Sample, Turn

PROTOCOL = tomllib.loads(protocol_file("tasks", "niah.toml").read_text())
_STOPWORDS = frozenset("a an and the is in on of to do at by for it be with what thing best sit".split())


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in str(text).replace(",", ";").split(";") if x.strip()]
    except ValueError:
        raise UserError(f"niah: {what} must be numbers separated by ';', got {text!r}.") from None


def content_words(text: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return [w for w in words if w not in _STOPWORDS]


def needle_recall(prediction: str, needle: str) -> float:
    """Fraction of the needle's content words present in the prediction (lcbench deviation)."""
    want = set(content_words(needle))
    have = set(content_words(prediction))
    return len(want & have) / len(want) if want else 0.0


FILLER = "filler"
ESSAYS = "essays"


def filler_text() -> str:
    """lcbench's built-in filler haystack (``tasks/niah.toml``; not upstream's)."""
    return " ".join(PROTOCOL["builtin_haystack"]["sentences"]) + " "


def read_haystack(path: str | Path) -> str:
    """Essays from a folder of ``*.txt`` (sorted; upstream globs in filesystem order) or one
    text/JSON file."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise UserError(f"niah: haystack folder '{p}' has no .txt files. Fix: point haystack= at a folder of essays "
                            f"(e.g. ../shared/data/niah/PaulGrahamEssays), or haystack=essays / haystack=filler.")
        return "".join(f.read_text(encoding="utf-8") for f in files)
    if p.is_file():
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".json":
            import json

            text = json.loads(text)["text"]
        return text
    raise UserError(f"niah: haystack '{p}' does not exist. Fix: pass a folder of .txt essays or a text file, or "
                    f"haystack=essays (upstream's, found or downloaded) or haystack=filler.")


@dataclass(frozen=True)
class ResolvedHaystack:
    """The haystack text and what to record about it (``meta`` goes into every sample)."""

    text: str
    kind: str  # "essays" or "filler"
    meta: dict[str, Any]


def resolve_haystack(choice: str | None, data_dir: Path | None = None) -> ResolvedHaystack:
    """``essays`` (default): upstream's 49 essays from the local data folder, lcbench's cache or a
    download (:func:`.essays.niah_essays`), else the filler **with a warning and the label**
    ``haystack=filler``; ``filler`` (also ``None``, what the argument's default was before
    lcbench 0.1's essays, so older specs replay as they ran); or a path."""
    if choice is None or choice == FILLER:
        return ResolvedHaystack(filler_text(), FILLER, {"haystack": FILLER, "haystack_source": "builtin filler",
                                                        "data_label": "filler"})
    if choice != ESSAYS:
        text = read_haystack(choice)
        return ResolvedHaystack(text, "path", {"haystack": "path", "haystack_source": str(choice),
                                               "haystack_sha256": essays.text_sha256(text)})
    found, why = essays.niah_essays(data_dir)
    if found is None:
        warnings.warn(f"niah: using lcbench's filler haystack, not upstream's Paul Graham essays: {why}. Records and "
                      f"tables are labelled haystack=filler / niah[filler]. Fix: run once with network access, or "
                      f"pass haystack=PATH to a folder of essays.", stacklevel=2)
        return ResolvedHaystack(filler_text(), FILLER, {"haystack": FILLER, "haystack_source": f"fallback: {why}",
                                                        "data_label": "filler"})
    return ResolvedHaystack(read_haystack(found.path), ESSAYS, {"haystack": ESSAYS, **found.meta()})


def system_folded(tokenizer) -> bool:
    """Upstream's system prompt goes in a system message; a chat template without a system role
    (Gemma-1/2, Mistral-7B-Instruct v0.x: they raise) gets it at the head of the context's user
    message instead, followed by a blank line, as Gemma-3's own template folds a system message
    (warned; records say system='folded')."""
    if not getattr(tokenizer, "chat_template", None) or accepts_system(tokenizer):
        return False
    warnings.warn("niah: the model's chat template has no system role; upstream's system prompt opens the "
                  "context's user message instead (records say system='folded').", stacklevel=2)
    return True


def two_user_messages(tokenizer, system: str | None) -> bool:
    """Whether upstream's message layout applies: ``[system, user: context, user: question]``
    (``providers/openai.py`` ``generate_prompt``; Anthropic's prompt file joins them instead). Needs a
    chat template that accepts two user messages in a row; without one the question joins the
    context's message (warned)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs += [{"role": "user", "content": "C"}, {"role": "user", "content": "Q"}]
    try:
        chat_text(tokenizer, msgs)
        return True
    except Exception as exc:  # jinja TemplateError: "roles must alternate" and the like
        warnings.warn(f"niah: the model's chat template rejects two user messages in a row ({exc}); the question "
                      f"joins the context's message (records say messages='one').", stacklevel=2)
        return False


def _period_test(tokenizer):
    """``is_period(token_id)``: does the token end a sentence, i.e. does its text end with '.'?

    Upstream compares against the ids of ``encode('.')``. For byte-level BPE (GPT, Llama-3,
    SmolLM2) that is the id a period gets inside text, and it is among the tokens accepted here.
    For SentencePiece-style tokenizers (Metaspace: Llama-2, Mistral) a standalone '.' encodes as
    '▁.', which never follows a word, so the upstream test never matches and the needle would
    slide back to position 0; judging each token by its decoded text works for both.
    """
    period = set(tokenizer(".", add_special_tokens=False)["input_ids"])
    seen: dict[int, bool] = {}

    def is_period(token_id: int) -> bool:
        if token_id in period:
            return True
        hit = seen.get(token_id)
        if hit is None:
            hit = seen[token_id] = tokenizer.decode([token_id]).endswith(".")
        return hit

    return is_period


class NeedleInAHaystack(Task):
    name = "niah"
    suite = "niah"
    version = PROTOCOL["version"]
    source = "gkamradt/LLMTest_NeedleInAHaystack@7b90d28"
    summary = "needle in a haystack, length × depth grid (offline scorer: lcbench deviation from the LLM judge)"
    params = (
        Param("lengths", str, PROTOCOL["defaults"]["lengths"], "context lengths in target tokens, ';'-separated",
              numbers=True, nonempty=True, min=221),
        Param("depths", str, PROTOCOL["defaults"]["depths"], "needle depths in percent, ';'-separated",
              numbers=True, nonempty=True, min=0, max=100),
        Param("linspace", str, None, "upstream grid 'min;max;n' for lengths (overrides lengths), e.g. 1000;16000;35",
              numbers=True, arity=3, min=1),
        Param("needle", str, "passkey", "'passkey' (random key per sample) or 'sandwich' (upstream default)",
              ("passkey", "sandwich")),
        Param("haystack", str, ESSAYS, "'essays' (upstream's Paul Graham essays: local data folder, cache or "
                                       "download; the filler if none, labelled), 'filler', or a folder/text file"),
        Param("max_new_tokens", int, PROTOCOL["defaults"]["max_new_tokens"], "tokens to generate (upstream 300)", min=1),
        Param("repeats", int, 1, "samples per (length, depth) cell, with different keys", min=1),
        Param("messages", str, "one", "'one': context, blank line, question in one user message (as upstream's "
                                      "Anthropic prompt); 'two': context and question as two user messages (upstream's "
                                      "OpenAI provider)", ("one", "two")),
    )

    def _grid(self) -> tuple[list[int], list[float]]:
        if self.args["linspace"]:
            lo, hi, n = _floats(self.args["linspace"], "linspace")
            lengths = [int(x) for x in np.round(np.linspace(lo, hi, int(n))).astype(int)]
        else:
            lengths = [int(x) for x in _floats(self.args["lengths"], "lengths")]
        depths = _floats(self.args["depths"], "depths")
        if any(d < 0 or d > 100 for d in depths):
            raise UserError("niah: depths are percentages in [0, 100].")
        if any(n <= PROTOCOL["upstream"]["final_context_length_buffer"] + 20 for n in lengths):
            raise UserError("niah: each length must exceed the 200-token buffer (use ≥ 300).")
        return lengths, depths

    def protocol_payload(self) -> Any:
        return {"protocol": PROTOCOL, "args": self.args, "version": self.version}

    @staticmethod
    def insert_needle(tokenizer, haystack_ids: list[int], needle: str, length: int, depth: float) -> str:
        """Upstream ``insert_needle``: cut to length − buffer, insert at depth, back to a period."""
        needle_ids = tokenizer(needle, add_special_tokens=False)["input_ids"]
        ctx = haystack_ids[:length]
        limit = length - PROTOCOL["upstream"]["final_context_length_buffer"]
        if len(ctx) + len(needle_ids) > limit:
            ctx = ctx[: limit - len(needle_ids)]
        if depth >= 100:
            ids = ctx + needle_ids
        else:
            is_period = _period_test(tokenizer)
            ip = int(len(ctx) * depth / 100)
            while ip > 0 and not is_period(ctx[ip - 1]):
                ip -= 1
            ids = ctx[:ip] + needle_ids + ctx[ip:]
        return tokenizer.decode(ids)

    def samples(self, env: TaskEnv) -> list[Sample]:
        lengths, depths = self._grid()
        up = PROTOCOL["upstream"]
        folded = system_folded(env.tokenizer)
        system = None if folded else up["system"]
        two = self.args["messages"] == "two" and two_user_messages(env.tokenizer, system)
        resolved = resolve_haystack(self.args["haystack"])
        haystack = resolved.text
        dataset = "niah" if resolved.kind != FILLER else "niah[filler]"
        tok = env.tokenizer
        unit = tok(haystack, add_special_tokens=False)["input_ids"]
        reps = max(lengths) // max(1, len(unit)) + 1
        hay_ids = (unit * reps)[: max(lengths)] if len(unit) * reps >= max(lengths) else unit * reps
        rng = random.Random(env.seed)
        out = []
        for length in lengths:
            for depth in depths:
                for r in range(self.args["repeats"]):
                    if self.args["needle"] == "passkey":
                        key = str(rng.randint(10000, 99999))
                        needle = PROTOCOL["passkey"]["needle"].format(key=key)
                        question, answers = PROTOCOL["passkey"]["retrieval_question"], [key]
                    else:
                        needle, question = up["needle"], up["retrieval_question"]
                        answers = [needle.strip()]
                    context = self.insert_needle(tok, hay_ids, needle, length, depth)
                    sid = f"niah-L{length}-D{depth:g}" + (f"-r{r}" if self.args["repeats"] > 1 else "")
                    asked = question + up["question_suffix"]
                    turn = Turn(question=asked if two else "\n\n" + asked, answers=answers,
                                max_new_tokens=self.args["max_new_tokens"], scorer=self.args["needle"])
                    if folded:
                        context = up["system"] + "\n\n" + context
                    out.append(Sample(sid, context, [turn], system=system, question_message=two,
                                      meta={"dataset": dataset, "length": length, "depth": depth,
                                            "length_bucket": length, "needle": self.args["needle"],
                                            "messages": "two" if two else "one", **resolved.meta,
                                            **({"system": "folded"} if folded else {})}))
        return out

    def score(self, sample: Sample, turn: Turn, prediction: str) -> dict[str, float]:
        if turn.scorer == "passkey":
            s = float(turn.answers[0] in prediction)
        else:
            s = needle_recall(prediction, turn.answers[0])
        return {"score": s, "score_10": round(1 + 9 * s)}
