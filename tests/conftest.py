"""Shared fixtures: a tiny random Llama with an offline BPE tokenizer (mechanics), the path of
../shared/data (real benchmark data), and pinned torch threads (the machine is shared)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# two threads, or the cores shared among pytest-xdist's workers (`pytest -n N`)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): a 2-layer random Llama with GQA, using lcbench attention."""
    from lcbench.engine.attach import use_lcbench_attention
    from lcbench.models.tiny import tiny_llama, tiny_tokenizer

    model = tiny_llama()
    use_lcbench_attention(model)
    return model, tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_sdpa():
    """The same tiny model (same weights) with plain SDPA attention, for model.generate references."""
    from lcbench.models.tiny import tiny_llama, tiny_tokenizer

    return tiny_llama(), tiny_tokenizer()


def engine_for(model, tokenizer, method: str = "full", ratio: float = 0.0, method_args: str | None = None, **cfg):
    from lcbench.engine.runner import Engine, EngineConfig
    from lcbench.methods.chain import Chain, resolve_chain

    return Engine(model, tokenizer, Chain.build(resolve_chain(method, method_args, ratio)), EngineConfig(**cfg))
