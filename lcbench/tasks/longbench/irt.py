"""MiniLongBench's predicted full-LongBench score (``eval_new_llm_by_pred.ipynb``, with the IRT
helpers it imports from tinyBenchmarks' ``irt.py``/``utils.py``).

The multidimensional 2PL model of ``data/irt_model/best_parameters.json`` gives item ``i`` a
discrimination ``a_i`` (D=10) and a difficulty ``b_i``; upstream's item curve is

    P_i(θ) = sigmoid( Σ_d clip(a_{i,d} θ_d − b_i, −30, 30) )

(``b`` is subtracted inside the sum, once per dimension, as upstream broadcasts it). A new
model's ability θ is the BFGS maximum-likelihood fit (scipy ``minimize``, start 0, numerical
gradient) on its observed scores, which may be fractional (Bernoulli likelihood with eps 1e-10).
The full-LongBench prediction keeps the observed scores and fills every other item with P(θ).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UserError


@dataclass(frozen=True)
class IrtModel:
    disc: np.ndarray  # (items, D)
    diff: np.ndarray  # (items,)

    @classmethod
    def load(cls, path: str | Path) -> "IrtModel":
        """Read ``best_parameters.json`` (py-irt ``multidim_2pl``: ``disc`` items×D, ``diff`` items×1)."""
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "best_parameters.json"
        try:
            params = json.loads(p.read_text(encoding="utf-8"))
            disc = np.asarray(params["disc"], dtype=float)
            diff = np.asarray(params["diff"], dtype=float).reshape(-1)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"irt_params '{path}': cannot read an IRT model ({type(exc).__name__}: {exc}). Fix: point "
                            f"irt_params at MiniLongBench's data/irt_model/best_parameters.json (or its folder).") from None
        if disc.ndim != 2 or disc.shape[0] != diff.shape[0]:
            raise UserError(f"irt_params '{path}': 'disc' must be items×dims and 'diff' items×1 "
                            f"(got {disc.shape} and {diff.shape}).")
        return cls(disc, diff)

    @property
    def items(self) -> int:
        return self.disc.shape[0]

    def curve(self, theta: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        """P(correct) of the given items (all by default) for ability ``theta`` (D,)."""
        a = self.disc if items is None else self.disc[items]
        b = self.diff if items is None else self.diff[items]
        z = np.clip(a * theta[None, :] - b[:, None], -30, 30).sum(axis=1)
        return 1 / (1 + np.exp(-z))

    def fit_ability(self, items: np.ndarray, scores: np.ndarray, eps: float = 1e-10) -> np.ndarray:
        """θ maximizing Σ y log(P+eps) + (1−y) log(1−P+eps) over the observed items (BFGS from 0)."""
        from scipy.optimize import minimize

        y = np.asarray(scores, dtype=float)

        def negative_log_likelihood(theta: np.ndarray) -> float:
            p = self.curve(theta, items)
            return -float(np.sum(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))

        return minimize(negative_log_likelihood, np.zeros(self.disc.shape[1]), method="BFGS").x

    def predict_all(self, items: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Every item's score: the observed ones kept, the rest predicted from the fitted θ."""
        items = np.asarray(items, dtype=int)
        full = self.curve(self.fit_ability(items, scores))
        full[items] = scores
        return full
