"""RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?"; NVIDIA/RULER@c3f5e3b) as one lcbench task: the 13 tasks generated offline at any length in
the target model's tokenizer, scored with ``string_match_all`` / ``string_match_part``.

Prompt split: every RULER template has the context before the question, so the context part is
the template up to the end of the context (with VT's one-shot example and CWE's solved example in
front) and the question part is the rest; the answer prefix follows the chat generation prompt,
as RULER's ``prepare.py`` puts it after the model template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...params import Param
from ..base import Task, TaskEnv, unknown_subtask
from ..essays import Haystack, ruler_essays
from ..sample import Sample, Turn
from .aggregation import CommonWordsGenerator, FreqWordsGenerator
from .layout import Layout
from .metrics import METRICS, postprocess_pred
from .niah import NiahGenerator
from .protocol import PROTOCOL, Generator, Rendered
from .qa import QAGenerator, load_qa
from .resources import essay_words, sentence_splitter
from .sizing import estimate_units, fit_units, upstream_fwe_units, upstream_units
from .variable_tracking import VariableTrackingGenerator


def _names(text: str) -> list[str]:
    names: list[str] = []
    for part in str(text).replace(",", ";").split(";"):
        part = part.strip()
        if part:
            names.extend(PROTOCOL["groups"].get(part, [part]))
    unknown = [n for n in names if n not in PROTOCOL["tasks"]]
    if unknown:
        raise unknown_subtask("ruler", "task", unknown[0], [*PROTOCOL["tasks"], *PROTOCOL["groups"]],
                              "tasks=niah_single_1;vt (';'-separated tasks or groups).")
    return list(dict.fromkeys(names))


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in str(text).replace(",", ";").split(";") if x.strip()]
    except ValueError:
        raise UserError(f"ruler: lengths must be integers separated by ';', got {text!r}.") from None
    if not lengths or min(lengths) < 256:
        raise UserError(f"ruler: lengths must be at least 256 tokens, got {text!r}. Fix: e.g. lengths=4096;8192.")
    return lengths


def _word_file(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"ruler cwe: cwe_words file '{p}' does not exist. Fix: a JSON list/object or a text file.")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        data = json.loads(text)
        return list(data.values()) if isinstance(data, dict) else list(data)
    return [w for w in text.split() if w]


def _flat(text: str) -> str:
    """Upstream ``remove_newline_tab``."""
    return " ".join(text.replace("\n", " ").replace("\t", " ").strip().split())


class Ruler(Task):
    name = "ruler"
    suite = "ruler"
    version = PROTOCOL["version"]
    source = "NVIDIA/RULER@c3f5e3b (scripts/data/synthetic, scripts/eval)"
    summary = "RULER's 13 synthetic long-context tasks at any length, in the target tokenizer"
    params = (
        Param("tasks", str, PROTOCOL["defaults"]["tasks"],
              "';'-separated tasks or groups: 'synthetic' (11, offline), 'all' (13; qa_1/qa_2 need data)"),
        Param("lengths", str, PROTOCOL["defaults"]["lengths"], "target sequence lengths (prompt + tokens to generate)",
              numbers=True, nonempty=True, min=256),
        Param("num_samples", int, PROTOCOL["defaults"]["num_samples"], "samples per task and length", min=1),
        Param("haystack", str, None, "essay haystack: RULER's PaulGrahamEssays.json, a folder of .txt, or a .txt "
                                     "file (default: the local data folder, else RULER's build, downloaded once)"),
        Param("squad", str, None, "SQuAD 2.0 dev JSON for qa_1 (default: hub rajpurkar/squad_v2)"),
        Param("hotpotqa", str, None, "HotpotQA dev distractor JSON for qa_2 (default: hub hotpotqa/hotpot_qa)"),
        Param("cwe_words", str, None, "extra English words for cwe beyond 8,169 (RULER's english_words.json)"),
        Param("chat", bool, True, "apply the model's chat template (RULER wraps every prompt in a model template)"),
        Param("remove_newline_tab", bool, False, "upstream REMOVE_NEWLINE_TAB (default false)"),
        Param("quirks", str, "upstream", "'upstream': with a chat template, cwe's solved example is an earlier chat "
                                         "turn and one-value NIAH's are→is rewrite reaches the template's own text, as "
                                         "RULER does; 'fixed': the chat template intact (layout.py)",
              ("upstream", "fixed")),
        Param("sizing", str, "fill", "'fill': each prompt filled to within one haystack unit of the length "
                                     "(lcbench); 'upstream': RULER's search, then whole steps dropped per sample",
              ("fill", "upstream")),
    )

    @classmethod
    def subtasks(cls) -> dict[str, str]:
        return {name: f"{spec['category']} ({spec['metric']})" for name, spec in PROTOCOL["tasks"].items()}

    def __init__(self, **args: Any):
        super().__init__(**args)
        self.haystack: Haystack | None = None
        self.task_names = _names(self.args["tasks"])
        self.lengths = _lengths(self.args["lengths"])
        if self.args["num_samples"] < 1:
            raise UserError("ruler: num_samples must be at least 1.")

    # --- generation ---------------------------------------------------------------------
    def _essay(self, env: TaskEnv) -> tuple[str, ...]:
        """The essay haystack's words (:func:`..essays.ruler_essays`: the haystack argument, the local
        data folder, lcbench's cache, or RULER's own download build); its record goes into meta."""
        self.haystack = ruler_essays(self.args["haystack"])
        return essay_words(str(self.haystack.path))

    def generator(self, task: str, length: int, env: TaskEnv) -> Generator:
        spec = PROTOCOL["tasks"][task]
        kind, seed = spec["generator"], env.seed
        if kind == "niah":
            essay = self._essay(env) if spec["args"]["type_haystack"] == "essay" else None
            return NiahGenerator(task, spec, length, seed, essay)
        if kind == "variable_tracking":
            return VariableTrackingGenerator(task, spec, length, seed, env.tokenizer)
        if kind == "common_words_extraction":
            extra = _word_file(self.args["cwe_words"]) if self.args["cwe_words"] else None
            return CommonWordsGenerator(task, spec, length, seed, extra)
        if kind == "freq_words_extraction":
            return FreqWordsGenerator(task, spec, length, seed)
        dataset = spec["args"]["dataset"]
        return QAGenerator(task, spec, length, seed, load_qa(dataset, self.args[dataset]))

    def layout(self, task: str, gen: Generator, tokenizer) -> Layout:
        kind = PROTOCOL["tasks"][task]["generator"]
        singular = kind == "niah" and gen.num_q * gen.num_v == 1
        return Layout(tokenizer, self.args["chat"], kind, singular, self.args["quirks"])

    def _sample(self, task: str, length: int, index: int, rendered: Rendered, units: int, layout: Layout) -> Sample:
        spec = PROTOCOL["tasks"][task]
        p = layout.parts(rendered)
        context, question = p.context, p.question
        if self.args["remove_newline_tab"]:
            context, question = _flat(context), " " + _flat(question)
        gen = PROTOCOL["templates"][spec["generator"]]
        turn = Turn(question=question, answers=list(rendered.answers), max_new_tokens=int(gen["tokens_to_generate"]),
                    scorer=spec["metric"], answer_prefix=p.answer_prefix)
        meta = {"dataset": task, "task": task, "suite": "ruler", "category": spec["category"], "length": length,
                "length_bucket": length, "index": index, "haystack_units": units,
                "prompt_tokens": layout.count(rendered), "sizing": self.args["sizing"],
                **{k: v for k, v in rendered.meta.items() if k in ("depth", "depths", "sentence_splitter")}}
        if layout.quirk:
            meta["upstream_quirk"] = layout.quirk
        if rendered.meta.get("haystack") == "essay" and self.haystack is not None:
            meta.update(self.haystack.meta())
        return Sample(f"ruler-{task}-L{length}-{index}", context, [turn], meta=meta, chat=p.chat, prefix=p.prefix)

    def _units(self, task: str, length: int, gen: Generator, layout: Layout) -> list[int]:
        """Haystack units per sample: filled to the budget (``sizing=fill``) or RULER's steps."""
        budget = length - gen.tokens_to_generate
        what = f"ruler {task} at {length}"

        def count_for(index: int):
            return lambda n: layout.count(gen.build(index, n))

        n_samples = self.args["num_samples"]
        if self.args["sizing"] == "upstream":
            if isinstance(gen, FreqWordsGenerator):
                return upstream_fwe_units(count_for, budget, n_samples, gen.wordlen)
            inc = gen.incremental or gen.probe
            return upstream_units(count_for, budget, n_samples, inc, estimate_units(count_for(-1), budget, gen.probe),
                                  gen.lower, gen.upper, what)
        out: list[int] = []
        for index in range(n_samples):
            count = count_for(index)
            start = out[-1] if out else estimate_units(count, budget, gen.probe)
            out.append(fit_units(count, budget, start, gen.lower, gen.upper, what))
        return out

    def samples(self, env: TaskEnv) -> list[Sample]:
        out: list[Sample] = []
        for length in self.lengths:
            for task in self.task_names:
                gen = self.generator(task, length, env)
                layout = self.layout(task, gen, env.tokenizer)
                for index, units in enumerate(self._units(task, length, gen, layout)):
                    out.append(self._sample(task, length, index, gen.build(index, units), units, layout))
        return out

    # --- scoring ------------------------------------------------------------------------
    def score(self, sample: Sample, turn: Turn, prediction: str) -> dict[str, float]:
        pred = postprocess_pred(prediction)
        return {"score": METRICS[turn.scorer](pred, turn.answers), "null": float(pred == "")}

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """RULER's reporting: per task and length the mean score (0–100, two decimals); per length the
        mean over tasks; ``score`` the mean over lengths; ``nulls`` the empty predictions."""
        cells: dict[tuple[str, int], list[float]] = {}
        nulls = 0
        for r in records:
            if r.get("score") is None:
                continue
            meta = r.get("meta", {})
            cells.setdefault((meta.get("dataset", "?"), int(meta.get("length", 0))), []).append(float(r["score"]))
            nulls += int(bool(r.get("null")))
        if not cells:
            return {}
        out: dict[str, float] = {}
        per_length: dict[int, list[float]] = {}
        for (task, length), scores in sorted(cells.items()):
            mean = round(sum(scores) / len(scores), 2)
            out[f"{task}@{length}"] = mean
            per_length.setdefault(length, []).append(mean)
        for length, means in sorted(per_length.items()):
            out[f"length_{length}"] = round(sum(means) / len(means), 2)
        out["score"] = round(sum(out[f"length_{n}"] for n in per_length) / len(per_length), 2)
        out["nulls"] = float(nulls)
        return out

    def protocol_payload(self) -> Any:
        uses_essay = any(PROTOCOL["tasks"][t]["args"].get("type_haystack") == "essay" for t in self.task_names)
        return {"name": self.name, "version": self.version, "protocol": PROTOCOL, "args": self.args,
                "sentence_splitter": sentence_splitter()[0] if uses_essay else None}
