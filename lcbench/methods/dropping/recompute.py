"""The common shape of gather-then-recompute methods (ILRe, REFORM): a pass of the method's own
picks context tokens for the question, and only those tokens and the question are prefilled through
every layer, at their true positions (a ``context_inputs`` stage). The picking pass is the method's
compression time, the prefill of what it kept its prefill time; the kept count is
``keep_count(n + q, ratio) − q`` of the ``n`` context tokens (the question's ``q`` counted, as every
query-aware method counts it), so the achieved KV ratio is the requested one."""

from __future__ import annotations

from abc import abstractmethod

import torch

from ...errors import UserError
from ..base import ContextInputs, Stage, keep_count


class GatherAndRecompute(Stage):
    """Subclasses implement :meth:`gather`; the stage prefills what it returns and the question."""

    needs_question = True  # the question is what the tokens are picked for (--query-aware)
    token_budget = False  # no cache stage: --budget is refused (the kept count follows --ratio)

    @abstractmethod
    def gather(self, model, ids: torch.Tensor, context: int, keep: int) -> torch.Tensor:
        """Sorted indices (k,) of the ``keep`` context tokens (of the first ``context`` of ``ids``)
        to recompute; may set ``self._stats``."""

    def context_inputs(self, model, ids, context_length, cache):
        if self.ratio <= 0:
            return None
        n, q = context_length, ids.shape[1] - context_length
        if q <= 0:
            raise UserError(f"method '{self.name}' picks the context tokens for the question, but the question is not "
                            f"part of the prefill. Fix: add --query-aware.")
        keep = max(1, min(n, keep_count(n + q, self.ratio) - q))
        if keep >= n:
            return None
        chosen = self.gather(model, ids, n, keep).to(ids.device)
        slots = torch.cat([chosen, torch.arange(n, ids.shape[1], device=ids.device)])
        return ContextInputs(embeds=model.get_input_embeddings()(ids)[:, slots], positions=slots[None])

    def begin_sample(self) -> None:
        self._stats = {}

    def sample_stats(self) -> dict[str, float]:
        return dict(getattr(self, "_stats", {}))
