"""LongBench v1 (21 datasets) and LongBench-E (13 datasets, length buckets) as lcbench tasks,
following THUDM/LongBench@2e00731 ``pred.py`` (prompting, truncation, chat rule, generation) and
``eval.py`` (scoring, first-line rule, buckets); shared/specs/suites.md §1.

Per-row ``score`` is 0–100 (``100 ×`` the metric), so a dataset's mean is LongBench's number.
``score_upstream`` reproduces LongBench's quirks, ``score_fixed`` applies the named fixes (see
:mod:`.metrics`); ``quirks=fixed`` makes the fixed one primary.

Chat wrapper (a labelled lcbench deviation): ``pred.py`` ``build_chat`` wraps prompts only for its 8
models (chatglm2/3, llama2 ``[INST]…[/INST]``, longchat/vicuna via fastchat, xgen, internlm) and
feeds every other model the raw prompt; lcbench's default ``chat=auto`` applies each model's own
chat template outside the no-chat list, since today's instruct models expect it. ``chat=never``
reproduces upstream's ids for any model outside the 8 exactly (``tokenizer(prompt)`` with default
special tokens; tested).

Prompt length: ``max_length`` comes from ``model2maxlen.json`` when the model is listed there,
else from the model's window minus the generation length and the chat template's tokens
(:func:`.prompt.prompt_budget`); the ``max_length`` parameter overrides both.
"""

from __future__ import annotations

import difflib
from typing import Any

from ...errors import UserError
from ...params import Param
from ..base import Task, TaskEnv
from ..sample import Sample, Turn
from . import data
from .aggregate import e_scores, longbench_scores
from .metrics import QUIRKY, ScoreOptions, score_prediction
from .prompt import chat_overhead, prompt_budget, render_prompt
from .protocol import length_bucket, longbench_protocol

PROTOCOL = longbench_protocol()


def common_params(default_datasets: str) -> tuple[Param, ...]:
    """Parameters shared by LongBench, LongBench-E and MiniLongBench."""
    return (
        Param("datasets", list, [], f"';'-separated datasets (default: {default_datasets})"),
        Param("data_dir", str, None, "local data: LongBench's data.zip or a folder of <dataset>.jsonl in its "
                                     "released format (default: data.zip from the Hugging Face hub, cached)"),
        Param("revision", str, data.default_revision(), "commit of the hub dataset zai-org/LongBench whose "
                                                       "data.zip is read (pinned; recorded in the spec)"),
        Param("chat", str, "auto", "chat template: auto (the model's, except LongBench's no-chat list; upstream "
                                   "wraps only its 8 models), always, never (upstream's raw prompt, exact)",
              ("auto", "always", "never")),
        Param("max_length", int, 0, "middle-truncation budget in tokens (0: model2maxlen.json, else the model window)",
              min=0),
        Param("n_per_dataset", int, 0, "use only the first N rows of each dataset (0: all)", min=0),
        Param("quirks", str, "upstream", "primary score: 'upstream' (LongBench's quirks) or 'fixed'",
              ("upstream", "fixed")),
        Param("code_sim_backend", str, "levenshtein", "fuzz.ratio backend for lcc/repobench-p: levenshtein "
                                                      "(python-Levenshtein, upstream's reference) or difflib",
              ("levenshtein", "difflib")),
    )


def pick_datasets(asked: list[str], allowed: list[str], task: str) -> list[str]:
    """The asked datasets in the suite's order, or all; unknown names get a did-you-mean error."""
    if not asked:
        return list(allowed)
    for name in asked:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{task}: unknown dataset '{name}'.{hint} Its datasets: {', '.join(allowed)}.")
    return [d for d in allowed if d in asked]


def uses_chat(dataset: str, mode: str) -> bool:
    """``pred.py``: the chat wrapper is skipped for trec, triviaqa, samsum, lsht, lcc, repobench-p."""
    if mode == "auto":
        return dataset not in PROTOCOL["no_chat"]
    return mode == "always"


def generation_rule(dataset: str, tokenizer, newline_stop: bool) -> dict[str, Any]:
    """samsum's ``generate(min_length=context_length+1, eos_token_id=[eos, id("\\n")])``."""
    if not (newline_stop and dataset in PROTOCOL["newline_stop"]):
        return {}
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    return {"stop_token_ids": (int(newline),), "min_new_tokens": 1}


class LongBenchBase(Task):
    """Rendering and scoring shared by the LongBench family; subclasses choose rows and templates."""

    suite = "longbench"
    version = PROTOCOL["version"]
    source = PROTOCOL["source"]
    score_scale = 100.0  # LongBench reports 0-100
    take_first_line = True  # eval.py's first-line rule for trec/triviaqa/samsum/lsht
    newline_stop = True  # pred.py's samsum generation rule

    # --- what subclasses provide -------------------------------------------------------
    def template(self, dataset: str) -> str:
        return PROTOCOL["prompts"][dataset]

    # --- building samples --------------------------------------------------------------
    def data_dir(self, env: TaskEnv):
        """The local copy of the released data (``data_dir=PATH`` / ``--data-dir``), or None: the hub."""
        return self.args["data_dir"]

    def build_sample(self, env: TaskEnv, dataset: str, row: dict[str, Any], sample_id: str,
                     meta: dict[str, Any], chat_tokens: int) -> Sample:
        """One row → one sample: template, middle truncation, split, chat rule, generation rule.
        ``chat_tokens`` is what the model's chat template adds (:func:`.prompt.chat_overhead`)."""
        chat = uses_chat(dataset, self.args["chat"])
        max_new = PROTOCOL["max_new_tokens"][dataset]
        overhead = chat_tokens if chat else 0
        max_length, budget_from = prompt_budget(env.model_name, env.model_max_length, max_new, overhead,
                                                PROTOCOL["model_max_length"], self.args["max_length"])
        rendered = render_prompt(env.tokenizer, self.template(dataset), row, max_length)
        turn = Turn(question=rendered.question_part, answers=list(row["answers"]), max_new_tokens=max_new,
                    scorer=PROTOCOL["metric"][dataset],
                    **generation_rule(dataset, env.tokenizer, self.newline_stop))
        length = row.get("length")
        full_meta = {
            "dataset": dataset, "language": PROTOCOL["language"][dataset], "category": PROTOCOL["category"][dataset],
            "length": length, "length_bucket": length_bucket(length),
            "all_classes": row.get("all_classes"), "_id": row.get("_id"),
            "prompt_tokens": rendered.prompt_tokens, "max_length": max_length, "max_length_from": budget_from,
            "truncated": rendered.truncated, "split": rendered.split, **meta,
        }
        return Sample(sample_id, rendered.context_part, [turn], meta=full_meta, chat=chat)

    # --- scoring -------------------------------------------------------------------------
    def score(self, sample: Sample, turn: Turn, prediction: str) -> dict[str, float]:
        dataset = sample.meta["dataset"]
        first = self.take_first_line and dataset in PROTOCOL["first_line"]
        backend = self.args["code_sim_backend"]
        args = (turn.scorer, prediction, turn.answers, sample.meta.get("all_classes"))
        upstream = score_prediction(*args, ScoreOptions(False, backend), first)
        fixed = score_prediction(*args, ScoreOptions(True, backend), first) if turn.scorer in QUIRKY else upstream
        primary = fixed if self.args["quirks"] == "fixed" else upstream
        scale = self.score_scale
        return {"score": scale * primary, "score_upstream": scale * upstream, "score_fixed": scale * fixed}

    def protocol_payload(self) -> Any:
        keys = ("version", "source", "prompts", "max_new_tokens", "model_max_length", "metric", "no_chat",
                "first_line", "newline_stop", "length_buckets", "leaderboard", "rouge", "zh_punctuation")
        return {"name": self.name, "protocol": {k: PROTOCOL[k] for k in keys},
                "rules": {"score_scale": self.score_scale, "first_line": self.take_first_line,
                          "newline_stop": self.newline_stop}, "args": self.args}


class LongBench(LongBenchBase):
    """LongBench v1: 21 datasets, 4,750 rows (``load_dataset('THUDM/LongBench', ds, split='test')``)."""

    name = "longbench"
    summary = "LongBench v1, 21 datasets (en/zh/code), LongBench's templates, truncation and scorers"
    params = common_params("all 21")
    config_suffix = ""  # the hub config / file name is <dataset><suffix>
    datasets_key = "datasets"  # the list in tasks/longbench.json

    @classmethod
    def subtasks(cls) -> dict[str, str]:
        return {d: f"{PROTOCOL['language'].get(d, '')} · {PROTOCOL['category'].get(d, '')} · {PROTOCOL['metric'][d]}"
                for d in PROTOCOL[cls.datasets_key]}

    def samples(self, env: TaskEnv) -> list[Sample]:
        out = []
        n = self.args["n_per_dataset"]
        chat_tokens = chat_overhead(env.tokenizer)
        for dataset in pick_datasets(self.args["datasets"], PROTOCOL[self.datasets_key], self.name):
            config = dataset + self.config_suffix
            rows = data.load_rows(config, self.data_dir(env), self.args["revision"])
            for index, row in enumerate(rows[:n] if n > 0 else rows):
                out.append(self.build_sample(env, dataset, row, f"{config}/{index}", {"index": index},
                                              chat_tokens))
        return out

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        return longbench_scores(records)


class LongBenchE(LongBench):
    """LongBench-E: 13 datasets with rows spread over 0-4k/4-8k/8k+ (config ``<dataset>_e``)."""

    name = "longbench_e"
    summary = "LongBench-E, 13 datasets bucketed by length (0-4k/4-8k/8k+)"
    params = common_params("the 13 LongBench-E datasets")
    config_suffix = "_e"
    datasets_key = "e_datasets"

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        return e_scores(records)
