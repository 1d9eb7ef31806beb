"""A method chain ``a+b+c``: stage components composed left to right (DESIGN.md).

The one budget knob ``--ratio r`` is the fraction of the context's KV memory the *chain* should
remove. With several memory-compressing components (text, cache, soft), each gets
``1 - (1 - r) ** (1 / n)`` so the product of what they keep is ``1 - r``. Sparse-attention
components keep the whole cache; they take ``r`` as the fraction of attention they skip
(density ``1 - r``) and stay out of that product. A ``name.ratio=x`` method-arg overrides one
component. What the chain achieves is measured, never multiplied out.

``--budget N`` instead fixes the tokens one token-keeping component keeps per layer and KV head
(lcbench/methods/budget.py); the chain's other compressing components then need their own
``name.ratio=x``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..params import parse_kv
from .base import Needs, Stage
from .budget import budget_refusal
from .registry import METHODS


def split_chain(text: str) -> list[str]:
    names = [n.strip() for n in text.split("+") if n.strip()]
    if not names:
        raise UserError("--method is empty. Fix: name a method, e.g. --method snapkv (see `lcbench ls methods`).")
    return names


def split_method_args(names: list[str], text: str | None) -> list[dict[str, str]]:
    """``window_size=32`` applies to every component that has it; ``snapkv.window_size=32`` to one."""
    raw = parse_kv(text, "--method-args")
    per: list[dict[str, str]] = [dict() for _ in names]
    for key, value in raw.items():
        if "." in key:
            owner, _, param = key.partition(".")
            if owner not in names:
                raise UserError(f"--method-args names '{owner}.{param}', but '{owner}' is not in the chain {'+'.join(names)}.")
            per[names.index(owner)][param] = value
            continue
        takers = [i for i, n in enumerate(names) if any(p.name == key for p in METHODS.get(n).params) or key == "ratio"]
        if not takers:  # let the first component raise its did-you-mean error
            takers = [0]
        for i in takers:
            per[i][key] = value
    return per


def is_sparse(cls) -> bool:
    return getattr(cls, "family", "") == "sparse_attention"


@dataclass
class Chain:
    stages: list[Stage]
    requested_ratio: float

    @classmethod
    def build(cls, spec: list[dict[str, Any]], ratio: float | None = None) -> "Chain":
        """From resolved component specs ``[{"name":..., "ratio":..., "args":{...}}]``."""
        stages = []
        for item in spec:
            stage_cls = METHODS.get(item["name"])
            stage = stage_cls(ratio=item["ratio"], **item["args"])
            stage.budget_tokens = item.get("budget")
            stages.append(stage)
        _refuse_cache_stage_after_a_late_cut(stages)
        return cls(stages, chain_ratio(spec) if ratio is None else ratio)

    @property
    def budget(self) -> int | None:
        """Tokens kept per layer and KV head by the chain's budgeted component (``--budget``), or None."""
        return next((s.budget_tokens for s in self.stages if s.budget_tokens is not None), None)

    def fixed_keep(self) -> float:
        """What the memory-compressing components other than the budgeted one and the text stages
        keep together (Π(1 − rᵢ)): a budget run's requested ratio is measured against it."""
        keep = 1.0
        for s in self._part(sparse=False):
            if s.budget_tokens is None and "text" not in s.stages:
                keep *= 1.0 - s.ratio
        return keep

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.stages)

    @property
    def needs(self) -> Needs:
        out = Needs()
        for s in self.stages:
            out = out.merge(s.needs)
        return out

    @property
    def tolerance(self) -> float:
        compressing = [s for s in self.stages if s.ratio > 0 or s.budget_tokens is not None]
        return max((s.tolerance for s in compressing), default=0.05)

    def has(self, stage: str) -> bool:
        return any(stage in s.stages for s in self.stages)

    def _part(self, sparse: bool) -> list[Stage]:
        return [s for s in self.stages if (s.ratio > 0 or s.budget_tokens is not None) and is_sparse(type(s)) == sparse]

    @property
    def memory_ratio(self) -> float:
        """KV memory the memory-compressing components should remove together (0 if none)."""
        keep = 1.0
        for s in self._part(sparse=False):
            keep *= 1.0 - s.ratio
        return 1.0 - keep

    @property
    def attention_ratio(self) -> float:
        """Fraction of attention the sparse components should skip (0 if none)."""
        return max((s.ratio for s in self._part(sparse=True)), default=0.0)

    def tolerance_of(self, sparse: bool) -> float:
        return max((s.tolerance for s in self._part(sparse)), default=0.05)


def _refuse_cache_stage_after_a_late_cut(stages: list[Stage]) -> None:
    """A stage that cuts layers only after the last one was prefilled (``cuts_after_last_layer``)
    must be the chain's last cache stage: the ones after it would compress layers it cuts later."""
    for i, stage in enumerate(stages):
        later = [s.name for s in stages[i + 1:] if "cache" in s.stages]
        if stage.cuts_after_last_layer and stage.ratio > 0 and later:
            raise UserError(f"method '{stage.name}' cuts the layers only once the last layer is prefilled, so "
                            f"'{later[0]}' after it in the chain would compress layers before they are cut. Fix: put "
                            f"'{stage.name}' last among the cache stages (e.g. {later[0]}+{stage.name}).")


def chain_ratio(spec: list[dict[str, Any]]) -> float:
    """The ratio a resolved chain requests: 1 − Π(1 − rᵢ) over its memory-compressing components
    (0 for ``full``); for a chain of sparse-attention components only, the attention skipped."""
    keep, sparse = 1.0, 0.0
    for item in spec:
        if is_sparse(METHODS.get(item["name"])):
            sparse = max(sparse, item["ratio"])
        else:
            keep *= 1.0 - item["ratio"]
    return round(1.0 - keep, 6) if keep < 1.0 else round(sparse, 6)


def compresses_nothing(method: str) -> bool:
    """Whether every component of the chain is a reference that keeps everything (``full``)."""
    names = [n.strip() for n in str(method).split("+") if n.strip()]
    return bool(names) and all(METHODS.get(n).family == "baseline" and "cache" not in METHODS.get(n).stages
                               for n in names)


def resolve_chain(method: str, method_args: str | None, ratio: float, budget: int | None = None) -> list[dict[str, Any]]:
    """Resolve a chain to component specs with every default filled in (for the RunSpec); with a
    ``budget``, the one compressing component without its own ``name.ratio`` takes it."""
    names = split_chain(method)
    per_args = split_method_args(names, method_args)
    classes = [METHODS.get(n) for n in names]
    compressing = [i for i, c in enumerate(classes)
                   if (c.family != "baseline" or c.name == "random") and not is_sparse(c)]
    budgeted = None if budget is None else _budgeted(names, classes, compressing, per_args, budget)
    if budgeted is not None:
        ratio = 0.0
    n = max(1, len([i for i in compressing if "ratio" not in per_args[i]]))
    fixed_keep = 1.0
    for i in compressing:
        if "ratio" in per_args[i]:
            fixed_keep *= 1.0 - float(per_args[i]["ratio"])
    target_keep = (1.0 - ratio) / fixed_keep if fixed_keep > 0 else 1.0
    share = 1.0 - min(1.0, target_keep) ** (1.0 / n)
    out = []
    for i, (name, cls) in enumerate(zip(names, classes)):
        args = dict(per_args[i])
        r = args.pop("ratio", None)
        default = ratio if is_sparse(cls) else (share if i in compressing else 0.0)
        comp_ratio = float(r) if r is not None else default
        if not 0.0 <= comp_ratio < 1.0:
            raise UserError(f"method '{name}': ratio must be in [0, 1), got {comp_ratio}.")
        stage = cls(ratio=comp_ratio, **args)  # validates names and types
        item = {"name": name, "ratio": round(comp_ratio, 6), "args": stage.args}
        if i == budgeted:
            item["budget"] = budget
        out.append(item)
    return out


def _budgeted(names: list[str], classes: list, compressing: list[int], per_args: list[dict], budget: int) -> int:
    """The index of the component a ``--budget`` applies to, or a UserError saying why none can."""
    chain = "+".join(names)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise UserError(f"--budget {budget!r}: must be a whole number of tokens ≥ 1 kept per layer and KV head. "
                        f"Fix: e.g. --budget 512.")
    free = [i for i in compressing if "ratio" not in per_args[i]]
    if not free:
        raise UserError(f"--budget {budget}: no component of '{chain}' is left to take it (each has its own "
                        f"name.ratio, or none compresses the cache). Fix: a dropping method, e.g. --method snapkv.")
    if len(free) > 1:
        others = ", ".join(f"{names[i]}.ratio=0.5" for i in free[1:])
        raise UserError(f"--budget {budget} fixes the tokens one component keeps, but '{chain}' has "
                        f"{len(free)} compressing components without their own ratio. Fix: give the others one, "
                        f"e.g. --method-args {others}.")
    why = budget_refusal(classes[free[0]])
    if why is not None:
        raise UserError(f"--budget {budget}: {why}. Fix: use --ratio for it, or chain a dropping method that takes "
                        f"the budget (e.g. --method snapkv+{names[free[0]]} --method-args {names[free[0]]}.ratio=0.5).")
    return free[0]
