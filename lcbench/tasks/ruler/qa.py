"""RULER's QA tasks (``scripts/data/synthetic/qa.py`` at NVIDIA/RULER@c3f5e3b; spec §2.3): a question
from SQuAD 2.0 dev (qa_1) or HotpotQA dev distractor (qa_2) among distractor documents.

Data: a local file in the upstream format (``squad.json`` = SQuAD 2.0 dev JSON,
``hotpotqa.json`` = ``hotpot_dev_distractor_v1.json``), or the hub (``rajpurkar/squad_v2``
validation, ``hotpotqa/hotpot_qa`` distractor validation), converted to the same structure.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

from ...errors import UserError
from ..hub import datasets_error_cause
from .protocol import PROTOCOL, Generator, Rendered, split_template

_QA = PROTOCOL["qa"]
HUB = {"squad": ("rajpurkar/squad_v2", None, "validation"), "hotpotqa": ("hotpotqa/hotpot_qa", "distractor", "validation")}


def squad_from_hub(rows: Any) -> dict:
    """HF ``squad_v2`` rows → the SQuAD JSON structure (articles → paragraphs → qas), file order."""
    articles: dict[str, dict[str, list]] = {}
    for row in rows:
        paragraphs = articles.setdefault(row["title"], {})
        qas = paragraphs.setdefault(row["context"], [])
        texts = list(row["answers"]["text"])
        qas.append({"question": row["question"], "answers": [{"text": t} for t in texts],
                    "is_impossible": not texts})
    return {"data": [{"title": t, "paragraphs": [{"context": c, "qas": q} for c, q in ps.items()]}
                     for t, ps in articles.items()]}


def hotpotqa_from_hub(rows: Any) -> list[dict]:
    """HF ``hotpot_qa`` (distractor) rows → the upstream JSON list."""
    return [{"question": r["question"], "answer": r["answer"],
             "context": [[t, list(s)] for t, s in zip(r["context"]["title"], r["context"]["sentences"])]}
            for r in rows]


def read_squad(data: dict) -> tuple[list[dict], list[str]]:
    """Upstream ``read_squad``: answerable questions; docs = sorted distinct paragraphs; the other
    paragraphs of the same article are the first distractors."""
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data["data"]:
        article = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            own = index[p["context"]]
            for qa in p["qas"]:
                if not qa.get("is_impossible", False):
                    qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                "context": [own], "more_context": [i for i in article if i != own]})
    return qas, docs


def read_hotpotqa(data: list[dict]) -> tuple[list[dict], list[str]]:
    """Upstream ``read_hotpotqa``: docs ``f"{title}\\n{''.join(sentences)}"``; all 10 context docs are gold."""
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]],
            "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    return qas, docs


@functools.lru_cache(maxsize=4)
def load_qa(dataset: str, path: str | None) -> tuple[tuple[dict, ...], tuple[str, ...]]:
    """(questions, documents) of ``dataset`` from ``path`` or, without one, from the hub."""
    reader = read_squad if dataset == "squad" else read_hotpotqa
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"ruler qa: {dataset} file '{p}' does not exist. Fix: {dataset}=PATH to the "
                            f"{'SQuAD 2.0 dev JSON' if dataset == 'squad' else 'HotpotQA dev distractor JSON'}.")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            qas, docs = reader(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"ruler qa: '{p}' is not in the upstream {dataset} format ({exc!r}). Fix: pass the "
                            f"original file (RULER's download_qa_dataset.sh fetches it).") from None
        return tuple(qas), tuple(docs)
    repo, config, split = HUB[dataset]
    try:
        import datasets

        rows = datasets.load_dataset(repo, config, split=split)
    except Exception as exc:  # datasets raises many types; datasets_error_cause names the real one
        raise UserError(
            f"ruler {'qa_1' if dataset == 'squad' else 'qa_2'} needs {dataset} data and the hub dataset '{repo}' "
            f"could not be loaded: {datasets_error_cause(exc)}. Fix: run once with network access (it is cached), "
            f"pass a local copy with --task-args {dataset}=PATH (the upstream JSON file), or drop the QA tasks "
            f"(tasks=synthetic)."
        ) from None
    data = squad_from_hub(rows) if dataset == "squad" else hotpotqa_from_hub(rows)
    qas, docs = reader(data)
    return tuple(qas), tuple(docs)


class QAGenerator(Generator):
    def __init__(self, task: str, spec: dict[str, Any], length: int, seed: int,
                 data: tuple[tuple[dict, ...], tuple[str, ...]]):
        super().__init__(task, spec, length, seed)
        self.qas, self.docs = data
        self.probe = _QA["incremental"]
        self.upper = len(self.docs)
        self.head, self.tail = split_template(self.template["template"])

    def _documents(self, rng: random.Random, qa: dict, n: int) -> list[str]:
        if n >= len(self.docs):
            return list(self.docs)
        gold, more = list(qa["context"]), list(qa.get("more_context", []))
        if n < len(gold):
            picked = rng.sample(gold, n)
        elif n - len(gold) < len(more):
            picked = gold + rng.sample(more, n - len(gold))
        else:
            taken = set(gold + more)
            others = [i for i in range(len(self.docs)) if i not in taken]
            picked = gold + more + rng.sample(others, max(0, n - len(gold) - len(more)))
        return [self.docs[i] for i in picked]

    def build(self, index: int, n: int) -> Rendered:
        if index >= len(self.qas):
            raise UserError(f"ruler {self.task}: sample {index} needs question {index + 1} but the data has "
                            f"{len(self.qas)} answerable questions. Fix: lower num_samples.")
        qa = self.qas[index]
        docs = self._documents(self.rng(index), qa, n)
        self.shuffle_rng().shuffle(docs)
        context = _QA["document_separator"].join(_QA["document_prompt"].format(i=i + 1, document=d)
                                                 for i, d in enumerate(docs))
        return Rendered(self.head, context, self.tail.format(query=qa["query"]), self.template["answer_prefix"],
                        list(qa["outputs"]), {"documents": len(docs)})
