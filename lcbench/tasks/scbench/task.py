"""SCBench (Li et al. 2024, "SCBench: A KV Cache-Centric Analysis of Long-Context Methods";
microsoft/MInference@fb56c91 ``scbench/``) as lcbench tasks: the 12 released tasks loaded from the
hub or a local folder, both shared-context modes, per-turn scores and their mean; plus offline
synthetic stand-ins registered apart (``scbench_*_synth``).

Scores are on SCBench's reported 0–100 scale. ``score`` reproduces upstream; where upstream's
scorer iterates a plain-string label character by character, ``score_fixed`` gives the result
with the label wrapped in a list (``score_upstream`` repeats ``score`` there, to be explicit).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

from ...errors import UserError
from ...params import Param
from ..base import Task, TaskEnv, unknown_subtask
from ..sample import Sample, Turn
from . import repoqa
from .data import load_rows
from .metrics import SCORERS, fixed_label, has_quirk
from .prompts import build_sample
from .protocol import PROTOCOL, TASKS
from .synthetic import synthetic_rows

_D = PROTOCOL["defaults"]
_MODE = Param("mode", str, _D["mode"], "multi_turn (gold history, SCBench's default) or multi_request (scdq)",
              ("multi_turn", "multi_request"))
_COMMON = (
    _MODE,
    Param("max_turns", int, _D["max_turns"], "turns per context (upstream --max_turns 5; 0 = all)", min=0),
    Param("max_seq_length", int, 0, "upstream --max_seq_length (131072); 0 = min(131072, the model's limit)", min=0),
    Param("chat", bool, True, "apply the model's chat template (upstream always passes --use_chat_template)"),
    Param("quirks", str, "upstream", "prompts: 'upstream' (mf chat follow-ups repeat the last turn's question "
                                     "line, as eval_utils does) or 'fixed' (each turn its own)", ("upstream", "fixed")),
)
_RELEASED = (
    Param("data_dir", str, None, "folder with the released <task>.jsonl files (default: the hub, or --data-dir)"),
    Param("num_samples", int, -1, "rows per task (-1 = all, upstream --num_eval_examples)", min=-1),
)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class SCBenchTask(Task):
    """Shared machinery: rows → samples, scoring by each turn's metric, per-turn aggregation."""

    suite = "scbench"
    version = PROTOCOL["version"]
    source = "microsoft/MInference@fb56c91 scbench/ (eval_utils.py, run_scbench.py, compute_scores.py)"
    datasets: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **args: Any):
        super().__init__(**args)
        self.mode = self.args["mode"]
        self._needles: dict[tuple[str, str], list[dict]] = {}

    # --- rows → samples -----------------------------------------------------------------
    def dataset_names(self) -> list[str]:
        return list(self.datasets)

    def rows(self, dataset: str, env: TaskEnv) -> list[dict]:
        """The rows of ``dataset`` (released data by default)."""
        folder = self.args.get("data_dir")
        rows = load_rows(dataset, folder)
        n = self.args.get("num_samples", -1)
        return rows[:n] if n is not None and n >= 0 else rows

    def base_task(self, dataset: str) -> str:
        return dataset

    def samples(self, env: TaskEnv) -> list[Sample]:
        max_seq = self.args["max_seq_length"] or min(_D["max_seq_length"], int(env.model_max_length))
        out: list[Sample] = []
        for dataset in self.dataset_names():
            task = self.base_task(dataset)
            rows = self.rows(dataset, env)
            if not rows:
                continue
            first_turns = len(rows[0]["multi_turns"])  # upstream: max_turn_size from the first row
            turn_budget = min(first_turns, self.args["max_turns"]) if self.args["max_turns"] > 0 else first_turns
            for i, row in enumerate(rows):
                sample = build_sample(task, row, sample_id=f"{dataset}-{row.get('id', i)}", dataset=dataset,
                                      mode=self.mode, chat=self.args["chat"], tokenizer=env.tokenizer,
                                      max_seq_length=max_seq, turn_budget=turn_budget,
                                      max_turns=self.args["max_turns"], quirks=self.args["quirks"])
                out.append(sample)
                self._collect_needles(sample)
        return out

    def _collect_needles(self, sample: Sample) -> None:
        """RepoQA compares an answer with every gold function of its repository (``needle_by_repo``)."""
        if "repo" not in sample.meta:
            return
        needles = self._needles.setdefault((sample.meta["dataset"], sample.meta["repo"]), [])
        needles.extend({"needle": str(t.meta["label"]), "name": t.meta["name"]}
                       for t in sample.turns if t.scorer == "repoqa")

    # --- scoring ------------------------------------------------------------------------
    def score(self, sample: Sample, turn: Turn, prediction: str) -> dict[str, float]:
        metric, lab = turn.scorer, turn.meta["label"]
        if metric == "repoqa":
            needles = self._needles.get((sample.meta["dataset"], sample.meta.get("repo")))
            if not needles:  # samples() not called in this process: this row's own functions
                needles = [{"needle": str(t.meta["label"]), "name": t.meta["name"]}
                           for t in sample.turns if t.scorer == "repoqa"]
            ok, _, sim = repoqa.evaluate(prediction, turn.meta["name"], needles, sample.meta.get("lang", "python"))
            out = {"score": 100.0 * ok, "similarity": sim,
                   "tree_sitter": float(repoqa.tree_sitter_available(sample.meta.get("lang", "python")))}
        else:
            value = 100.0 * SCORERS[metric](prediction, lab)
            out = {"score": value}
            if has_quirk(metric, lab):
                out["score_upstream"] = value
                out["score_fixed"] = 100.0 * SCORERS[metric](prediction, fixed_label(metric, lab))
        if turn.meta.get("subtask"):
            out[f"score_{turn.meta['subtask'].removeprefix('scbench_')}"] = out["score"]
        return out

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """Per dataset: the mean per turn index (``<dataset>/turn_<k>``) and their mean
        (``<dataset>``), the fixed variant where it exists, and for the two mixed tasks the mean per
        subtask (their dataset score is the mean of the two); ``score`` = mean over datasets."""
        by_dataset: dict[str, list[dict]] = {}
        for r in records:
            if r.get("score") is not None:
                by_dataset.setdefault(r.get("meta", {}).get("dataset", "?"), []).append(r)
        out: dict[str, float] = {}
        for dataset, recs in sorted(by_dataset.items()):
            for key, suffix in (("score", ""), ("score_fixed", "/fixed")):
                per_turn: dict[int, list[float]] = {}
                for r in recs:
                    value = r.get(key, r["score"]) if key == "score_fixed" else r["score"]
                    per_turn.setdefault(int(r.get("turn", 0)), []).append(float(value))
                if key == "score_fixed" and not any("score_fixed" in r for r in recs):
                    continue
                means = {k: _mean(v) for k, v in sorted(per_turn.items())}
                for k, m in means.items():
                    out[f"{dataset}{suffix}/turn_{k}"] = m
                out[f"{dataset}{suffix}"] = _mean(list(means.values()))
            subs = sorted({k for r in recs for k in r if k.startswith("score_") and k not in
                           ("score_fixed", "score_upstream")})
            if subs:
                for key in subs:
                    out[f"{dataset}/{key.removeprefix('score_')}"] = _mean([float(r[key]) for r in recs if key in r])
                out[dataset] = _mean([out[f"{dataset}/{k.removeprefix('score_')}"] for k in subs])
        datasets = sorted(by_dataset)
        if datasets:
            out["score"] = _mean([out[d] for d in datasets])
        return out

    def protocol_payload(self) -> Any:
        return {"name": self.name, "version": self.version, "mode": self.mode, "args": self.args,
                "datasets": self.dataset_names(), "protocol": PROTOCOL,
                "repoqa_tree_sitter": repoqa.tree_sitter_available()}


class SCBench(SCBenchTask):
    name = "scbench"
    summary = "SCBench's 12 released tasks (hub or local folder), multi-turn or multi-request"
    params = (Param("tasks", str, "all", "';'-separated task names (scbench_kv or kv) or 'all'"),) + _COMMON + _RELEASED

    @classmethod
    def subtasks(cls) -> dict[str, str]:
        return {t.removeprefix("scbench_"): f"released task {t}" for t in TASKS}

    def dataset_names(self) -> list[str]:
        if self.args["tasks"] in ("all", "", None):
            return list(TASKS)
        names = []
        for part in str(self.args["tasks"]).replace(",", ";").split(";"):
            part = part.strip()
            if not part:
                continue
            full = part if part.startswith("scbench_") else f"scbench_{part}"
            if full not in TASKS:
                raise unknown_subtask("scbench", "task", part, [t.removeprefix("scbench_") for t in TASKS],
                                      "tasks=kv;vt (';'-separated).")
            names.append(full)
        return names


class SCBenchSynthetic(SCBenchTask):
    """An offline stand-in: rows generated in the released format, scored as the released task."""

    params = _COMMON + (
        Param("length", int, PROTOCOL["synthetic"]["length"], "tokens of the first turn's prompt", min=1),
        Param("num_samples", int, PROTOCOL["synthetic"]["num_samples"], "generated contexts", min=1),
        Param("num_turns", int, PROTOCOL["synthetic"]["num_turns"], "questions per context", min=1),
    )

    def base_task(self, dataset: str) -> str:
        return dataset.removesuffix("_synth")

    def rows(self, dataset: str, env: TaskEnv) -> list[dict]:
        if self.args["num_samples"] < 1 or self.args["num_turns"] < 1:
            raise UserError(f"{dataset}: num_samples and num_turns must be at least 1.")
        return synthetic_rows(self.base_task(dataset), length=self.args["length"],
                              num_samples=self.args["num_samples"], num_turns=self.args["num_turns"],
                              seed=env.seed, tokenizer=env.tokenizer, chat=self.args["chat"])


def _released(task: str) -> type[SCBenchTask]:
    spec = PROTOCOL["tasks"][task]
    return type(f"SCBench_{task}", (SCBenchTask,), {
        "name": task, "datasets": (task,), "params": _COMMON + _RELEASED, "__module__": __name__,
        "summary": f"SCBench {task.removeprefix('scbench_')} ({spec['category']}), released data",
        "__doc__": f"SCBench's released {task} (metric: {spec['metric']})."})


def _synthetic(task: str) -> type[SCBenchTask]:
    return type(f"SCBench_{task}_synth", (SCBenchSynthetic,), {
        "name": f"{task}_synth", "datasets": (f"{task}_synth",), "__module__": __name__,
        "summary": f"offline stand-in for SCBench {task.removeprefix('scbench_')} (not the released data)",
        "__doc__": f"Generated rows in {task}'s format, scored as {task}."})


# one class per registered name, reachable as ``RELEASED.scbench_kv`` / ``SYNTHETIC.scbench_kv_synth``
RELEASED = SimpleNamespace(**{t: _released(t) for t in TASKS})
SYNTHETIC = SimpleNamespace(**{f"{t}_synth": _synthetic(t) for t in
                               ("scbench_kv", "scbench_prefix_suffix", "scbench_vt", "scbench_mf")})
