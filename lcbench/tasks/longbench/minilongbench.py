"""MiniLongBench (MilkThink-Lab/MiniLongBench@504c247; shared/specs/suites.md §5): the released
237-item subset of LongBench (``data/anchor.pkl``, shipped as ``tasks/minilongbench_ids.json``),
scored and averaged as MiniLongBench does, optionally with its IRT prediction of the full
LongBench score.

- Prompts: the OpenCompass templates that produced MiniLongBench's released predictions
  (LongBench's, except qasper/narrativeqa/multi_news; ``templates=longbench`` for LongBench's own).
  Middle truncation, generation lengths and the chat rule follow LongBench's ``pred.py``; samsum
  has no newline stop (the released samsum predictions run past the first line).
- Scores: LongBench's metrics, per item in [0, 1], **no** first-line rule
  (``minilongbench_scorer.py`` at the pinned commit).
- Aggregates (``eval_new_llm_directly.ipynb``): per-dataset mean; category = mean of its
  datasets by ``per_scen``; ALL = mean of the six categories; EN / ZH = mean of the 16 en+code /
  5 zh datasets. With ``irt_params``: the same numbers on the predicted full LongBench
  (``pred/...``) and the balance-weighted mean ``pred/weighted`` (``eval_new_llm_by_pred.ipynb``).

Data: ``data_dir`` may be the shared ``minilongbench_237.jsonl`` (a file, or the folder holding
it: rows with ``dataset, mini_key, global_idx, context, input, answers, all_classes``), a folder of
LongBench ``<dataset>.jsonl`` files, or nothing (the hub). Items are taken from LongBench's test
split by row ``global_idx − offset``, which assumes MiniLongBench's item order is the hub's row
order (shared/specs/suites.md §5.4; not verifiable offline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from ...params import Param
from ..base import TaskEnv
from ..sample import Sample
from . import data
from .aggregate import dataset_means, variant_means
from .irt import IrtModel
from .prompt import chat_overhead, render_parts
from .protocol import longbench_protocol, minilongbench_protocol
from .task import LongBenchBase, common_params, pick_datasets

MINI = minilongbench_protocol()
SHARED_FILE = "minilongbench_237.jsonl"


def mini_items() -> list[tuple[str, int, int, int]]:
    """(dataset, key, global index, LongBench row) for the 237 items, in MiniLongBench's order."""
    out = []
    for dataset in MINI["dataset_order"]:
        for key, global_idx in enumerate(MINI["items"][dataset]):
            out.append((dataset, key, global_idx, global_idx - MINI["offset"][dataset]))
    return out


def category_of(dataset: str) -> str:
    return MINI["categories"][MINI["per_scen"][MINI["dataset_order"].index(dataset)]]


def summary(per_dataset: dict[str, float]) -> dict[str, float]:
    """Categories, ALL, EN and ZH from per-dataset means (each only when all its members are there)."""
    out: dict[str, float] = {}
    categories = {}
    for category in MINI["categories"]:
        members = [d for d in MINI["dataset_order"] if category_of(d) == category]
        if all(d in per_dataset for d in members):
            categories[category] = sum(per_dataset[d] for d in members) / len(members)
    out.update(categories)
    if len(categories) == len(MINI["categories"]):
        out["ALL"] = sum(categories.values()) / len(categories)
    zh = MINI["zh_datasets"]
    en = [d for d in MINI["dataset_order"] if d not in zh]
    for name, members in (("EN", en), ("ZH", zh)):
        if all(d in per_dataset for d in members):
            out[name] = sum(per_dataset[d] for d in members) / len(members)
    return out


def balance_weights() -> np.ndarray:
    """``N / (num_cat * 6 * n_dataset)`` per item of the full LongBench (num_cat 4, 3 Synthetic, 2 Code)."""
    sizes = MINI["dataset_sizes"]
    total = sum(sizes.values())
    weights = np.ones(total)
    for dataset in MINI["dataset_order"]:
        members = sum(1 for d in MINI["dataset_order"] if category_of(d) == category_of(dataset))
        start = MINI["offset"][dataset]
        weights[start:start + sizes[dataset]] = total / (members * 6 * sizes[dataset])
    return weights


def predicted_scores(model: IrtModel, item_scores: dict[int, float]) -> dict[str, float]:
    """``pred/...``: MiniLongBench's summary of the IRT-predicted full LongBench."""
    total = sum(MINI["dataset_sizes"].values())
    if model.items != total:
        raise UserError(f"irt_params: the IRT model has {model.items} items but LongBench has {total}. Fix: use "
                        f"MiniLongBench's data/irt_model/best_parameters.json.")
    items = np.array(sorted(item_scores))
    full = model.predict_all(items, np.array([item_scores[i] for i in items]))
    per_dataset = {}
    for dataset in MINI["dataset_order"]:
        start = MINI["offset"][dataset]
        per_dataset[dataset] = float(full[start:start + MINI["dataset_sizes"][dataset]].mean())
    out = {f"pred/{k}": v for k, v in per_dataset.items()}
    out.update({f"pred/{k}": v for k, v in summary(per_dataset).items()})
    out["pred/weighted"] = float((balance_weights() * full).mean())
    return out


class MiniLongBench(LongBenchBase):
    """The 237 MiniLongBench items; per-item scores in [0, 1] (see the module docstring)."""

    name = "minilongbench"
    suite = "minilongbench"
    version = MINI["version"]
    source = MINI["source"]
    summary = "MiniLongBench: 237 LongBench items, MiniLongBench's averaging and optional IRT prediction"
    params = common_params("all 21") + (
        Param("templates", str, MINI["protocol"]["templates"], "prompt templates: opencompass (MiniLongBench's "
              "released predictions) or longbench", ("opencompass", "longbench")),
        Param("irt_params", str, None, "MiniLongBench's data/irt_model/best_parameters.json: adds the predicted "
                                       "full-LongBench scores (pred/...) to the aggregate"),
    )
    score_scale = MINI["protocol"]["score_scale"]
    take_first_line = MINI["protocol"]["first_line"]
    newline_stop = MINI["protocol"]["newline_stop"]

    @classmethod
    def subtasks(cls) -> dict[str, str]:
        proto = longbench_protocol()
        return {d: f"{proto['language'].get(d, '')} · {proto['category'].get(d, '')} · {proto['metric'][d]}"
                for d in MINI["dataset_order"]}

    def template(self, dataset: str) -> str:
        proto = longbench_protocol()
        if self.args["templates"] == "opencompass":
            return proto["opencompass_prompts"].get(dataset, proto["prompts"][dataset])
        return proto["prompts"][dataset]

    def protocol_payload(self) -> Any:
        payload = super().protocol_payload()
        payload["minilongbench"] = MINI
        payload["opencompass_prompts"] = longbench_protocol()["opencompass_prompts"]
        return payload

    # --- data -------------------------------------------------------------------------------
    def _shared_rows(self, path: Path) -> dict[tuple[str, int], dict[str, Any]]:
        """Rows of ``minilongbench_237.jsonl``; items without a context/input split (repobench-p,
        whose template joins ``{context}{input}``) take the whole code as context, input empty."""
        table = {(d, k): g for d, k, g, _ in mini_items()}
        out = {}
        for row in data.read_jsonl(path, required=()):  # checked against the item table below
            key = (row.get("dataset"), int(row.get("mini_key", -1)))
            if table.get(key) != row.get("global_idx"):
                raise UserError(f"{path}: row {key} (global_idx {row.get('global_idx')}) is not a MiniLongBench item. "
                                f"Fix: use the shared minilongbench_237.jsonl or LongBench's own files.")
            if row.get("context") is None:
                row = {**row, "context": self._context_from_prompt(row, path), "input": ""}
            out[key] = row
        return out

    def _context_from_prompt(self, row: dict[str, Any], path: Path) -> str:
        prompt = row.get("prompt_opencompass") or ""
        head, tail = render_parts(self.template(row["dataset"]), {"context": "", "input": ""})
        if not (prompt.startswith(head) and prompt.endswith(tail)) or len(prompt) < len(head) + len(tail):
            raise UserError(f"{path}: item {row['dataset']}/{row.get('mini_key')} has neither context nor a prompt "
                            f"rendered with the {self.args['templates']} template. Fix: use templates=opencompass.")
        return prompt[len(head):len(prompt) - len(tail)]

    def _longbench_rows(self, datasets: list[str], data_dir) -> dict[tuple[str, int], dict[str, Any]]:
        out = {}
        for dataset in datasets:
            rows = data.load_rows(dataset, data_dir, self.args["revision"])
            for _, key, global_idx, row_index in (i for i in mini_items() if i[0] == dataset):
                if row_index >= len(rows):
                    raise UserError(f"LongBench '{dataset}' has {len(rows)} rows; MiniLongBench needs row {row_index}. "
                                    f"Fix: use the full LongBench test split.")
                out[dataset, key] = rows[row_index]
        return out

    def load(self, datasets: list[str], env: TaskEnv) -> dict[tuple[str, int], dict[str, Any]]:
        source = self.data_dir(env)
        if source:
            path = Path(source).expanduser()
            if path.is_file():
                return self._shared_rows(path)
            if (path / SHARED_FILE).is_file():
                return self._shared_rows(path / SHARED_FILE)
        return self._longbench_rows(datasets, source)

    # --- samples ----------------------------------------------------------------------------
    def samples(self, env: TaskEnv) -> list[Sample]:
        datasets = pick_datasets(self.args["datasets"], MINI["dataset_order"], self.name)
        rows = self.load(datasets, env)
        n = self.args["n_per_dataset"]
        chat_tokens = chat_overhead(env.tokenizer)
        out = []
        for dataset, key, global_idx, row_index in mini_items():
            if dataset not in datasets or (n > 0 and key >= n):
                continue
            if (dataset, key) not in rows:
                raise UserError(f"minilongbench: item {dataset}/{key} is missing from the data. Fix: pass the complete "
                                f"minilongbench_237.jsonl or LongBench's files as data_dir.")
            meta = {"index": row_index, "global_idx": global_idx, "mini_key": key, "category": category_of(dataset)}
            out.append(self.build_sample(env, dataset, rows[dataset, key], f"{dataset}/{key}", meta, chat_tokens))
        return out

    # --- aggregation ------------------------------------------------------------------------
    def aggregate(self, records: list[dict]) -> dict[str, float]:
        per_dataset = dataset_means(records, digits=None)
        if not per_dataset:
            return {}
        out = {d: per_dataset[d] for d in MINI["dataset_order"] if d in per_dataset}
        out.update(variant_means(records, digits=None))
        out.update(summary(per_dataset))
        out["score"] = out.get("ALL", sum(per_dataset.values()) / len(per_dataset))
        if self.args["irt_params"]:
            out.update(predicted_scores(IrtModel.load(self.args["irt_params"]), self.item_scores(records)))
        return out

    def suite_score(self, records: list[dict]) -> float | None:
        """``ALL`` without the IRT prediction (which needs every item once, not a resample)."""
        per_dataset = dataset_means(records, digits=None)
        if not per_dataset:
            return None
        return summary(per_dataset).get("ALL", sum(per_dataset.values()) / len(per_dataset))

    @staticmethod
    def item_scores(records: list[dict]) -> dict[int, float]:
        """Global LongBench index → primary score; the IRT prediction needs all 237 items."""
        scores = {r["meta"]["global_idx"]: float(r["score"]) for r in records if r.get("score") is not None}
        missing = len(mini_items()) - len(scores)
        if missing:
            raise UserError(f"irt_params: the IRT prediction needs scores for all {len(mini_items())} MiniLongBench "
                            f"items; {missing} are missing. Fix: run every dataset in full (no datasets= or "
                            f"n_per_dataset= limits), or drop irt_params.")
        return scores
