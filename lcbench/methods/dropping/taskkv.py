"""Task-aware KV compression: the observation window is a task prompt appended after the context
(the task description and few-shot questions), which scores the context and is then dropped.

Corallo, Weller, Petroni and Papotti, "Beyond RAG: Task-Aware KV Cache Compression for
Comprehensive Knowledge Reasoning" (arXiv:2503.04973). The paper compresses a corpus once, for a
task rather than for one query: the task instructions (T) and, in its few-shot variant, example
questions (FS) follow the context, the cross-attention of those prompt tokens over the context
picks the KV pairs to keep, and the compressed cache alone then serves every question of the task.
No official implementation was found (the code index and kvpress 0.5.5, which ships the same
authors' Finch press but no task-aware one, were searched); this follows the paper's description.

What runs, per sample (the task prompt is tokenized once per model by :meth:`TaskKV.calibrate`):

1. :meth:`TaskKV.context_inputs` runs the model over *context + task prompt* through lcbench's
   attention (its own forward state, so sliding windows, softcap and sinks are honoured). In each
   layer the attention of every task-prompt query over the context is scored SnapKV-style (mean
   over the prompt's queries, ``kernel_size`` average pooling, averaged over each KV group's query
   heads) and recorded by true position; that layer's scratch KV is then freed, so the pass never
   holds more than one layer's full cache. The task prompt is never stored: it is "dropped".
2. The engine prefills the sample as usual (the context, and in ``--query-aware`` mode the question
   after it, at true positions), and :meth:`TaskKV.compress_layer` keeps each KV head's top-scoring
   context tokens at ``--ratio`` (or ``--budget``), with the protected question; other cache stages
   of a chain (``taskkv+kivi``) act in that pass as after any dropping method.

The context's KV is therefore computed twice (the scoring pass and the kept prefill); the scoring
pass counts as compression time. Causal attention makes the context's KV the same in both passes.

Params: ``task`` (the task description; default a generic factual-QA instruction, lcbench's
wording), ``few_shot`` (example questions, ``;``-separated; the paper's few-shot variant; empty =
its zero-shot variant). Not implemented: the paper's few-shot *answers* (only questions are asked
for here; put worked examples into ``task`` to include them), and its corpus-level setting
(one compressed cache reused across a task's samples: lcbench compresses each sample's context,
with the same task prompt every time, so every question of a sample meets the same cache).
"""

from __future__ import annotations

import torch

from ...errors import UserError
from ...params import Param
from ..base import Needs, Stage
from .select import keep_top
from .snapkv import KERNEL_SIZE, POOLING, window_scores

TASK = ("Read the documents above carefully: you will be asked factual questions about them, and must "
        "answer from what they say.")
SEPARATOR = "\n\n"


def task_prompt(task: str, few_shot: list[str]) -> str:
    """The text appended after the context: the task description, then the example questions."""
    text = SEPARATOR + task.strip()
    if few_shot:
        text += "\nExample questions:\n" + "\n".join(f"- {q.strip()}" for q in few_shot if q.strip())
    return text


class _Scorer:
    """The scoring pass's only cache stage (what :class:`~lcbench.engine.state.ForwardState` calls a
    cache stage by: ``stages``, ``needs``, ``budget_tokens``, ``compress_layer``; not a registered
    method): record each layer's task-window scores by true position, then free the layer."""

    stages = ("cache",)
    budget_tokens = None

    def __init__(self, window: int, kernel: int, pooling: str, context_length: int):
        self.window, self.kernel, self.pooling, self.context_length = window, kernel, pooling, context_length
        self.needs = Needs(window=window)
        self.scores: dict[int, torch.Tensor] = {}

    def compress_layer(self, layer, seen):
        n = seen.context_length  # context slots this layer holds (a sliding window may have forgotten some)
        s = window_scores(seen, self.window, self.kernel, self.pooling)[..., :n]  # (1, H_kv, n)
        by_position = s.new_full((*s.shape[:2], self.context_length), float("-inf"))
        positions = layer.positions[..., :n].to(s.device)
        by_position.scatter_(2, positions, s.float())
        self.scores[seen.layer_idx] = by_position
        layer.crop_to(0)
        return layer


class TaskKV(Stage):
    name = "taskkv"
    family = "kv_dropping"
    paper = ("Corallo, Weller, Petroni and Papotti, Beyond RAG: Task-Aware KV Cache Compression for Comprehensive "
             "Knowledge Reasoning (arXiv:2503.04973)")
    summary = ("a task prompt (description + few-shot questions) appended after the context scores it SnapKV-style, "
               "then is dropped; the top tokens per KV head are kept")
    defaults = {"task": TASK, "few_shot": []}
    params = (
        Param("task", str, None, "the task description appended after the context to score it"),
        Param("few_shot", list, None, "example questions of the task, ';'-separated (empty: zero-shot)"),
        KERNEL_SIZE,
        POOLING,
    )
    calibration_params = ("task", "few_shot")

    def calibrate(self, model, tokenizer):
        """The task prompt's token ids in the model's tokenizer (``{"task_ids": [...]}``)."""
        ids = tokenizer(task_prompt(self.args["task"], self.args["few_shot"]), add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError("taskkv: the task prompt is empty. Fix: pass --method-args task='<the task description>'.")
        return {"task_ids": list(ids)}

    def begin_sample(self):
        self._scores: dict[int, torch.Tensor] | None = None
        self._prompt_tokens: int | None = None

    def _task_ids(self) -> list[int]:
        if self.calibration is None:
            raise UserError("taskkv has no tokenized task prompt. Fix: run it through lcbench's engine, which "
                            "calibrates it once per model, or set stage.calibration = stage.calibrate(model, tokenizer).")
        return list(self.calibration["task_ids"])

    @torch.inference_mode()
    def context_inputs(self, model, ids, context_length, cache):
        self._scores = None
        if (self.ratio <= 0 and self.budget_tokens is None) or context_length <= 1:
            return None
        from ...engine.decode import forward  # the engine imports methods: import it when it runs
        from ...engine.state import PREFILL, ForwardState
        from ...engine.timing import Stopwatch

        task = torch.tensor([self._task_ids()], dtype=ids.dtype, device=ids.device)
        x = torch.cat([ids[:, :context_length], task], dim=1)
        scorer = _Scorer(task.shape[1], self.args["kernel_size"], self.args["pooling"], context_length)
        state = ForwardState(cache=type(cache)(len(cache.layers)), stages=[scorer], needs=scorer.needs,
                             timer=Stopwatch([ids.device]))
        state.phase, state.compressing, state.protected = PREFILL, True, task.shape[1]
        forward(model, x, torch.arange(x.shape[1], device=ids.device)[None], state)
        self._scores = scorer.scores
        self._prompt_tokens = task.shape[1]
        return None  # the engine prefills the sample itself; compress_layer keeps what the task prompt chose

    def sample_stats(self) -> dict[str, float]:
        """``taskkv_prompt_tokens``: the task prompt's length (the observation window) on this sample."""
        tokens = getattr(self, "_prompt_tokens", None)
        return {} if tokens is None or self._scores is None else {"taskkv_prompt_tokens": float(tokens)}

    def compress_layer(self, layer, seen):
        if self.ratio <= 0:
            return layer
        if self._scores is None or seen.layer_idx not in self._scores:
            raise UserError("taskkv scores the context in its own pass before the prefill (context_inputs); it "
                            "cannot compress a cache prefilled without it (e.g. a shared prefill). Fix: run it as "
                            "the chain's first component, without prefill sharing.")
        scores = self._scores[seen.layer_idx]
        positions = layer.positions[..., : seen.context_length].clamp(max=scores.shape[-1] - 1)
        by_slot = scores.to(positions.device).gather(2, positions)  # the slots this pass holds
        return keep_top(layer, by_slot, self.ratio, seen)
