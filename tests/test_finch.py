"""Finch (lcbench/methods/dropping/finch.py): the question's attention keeps the context tokens it
looks at; on a fixed one-chunk input it keeps exactly kvpress FinchPress's positions; chunk by chunk
(--compress-chunks) the question observes every chunk; without --query-aware it is refused."""

from __future__ import annotations

import kvpress
import pytest
import torch
from test_dropping import CONTEXT, context_ids, kept_positions, model, prefill, tok  # noqa: F401  (fixtures)
from test_kvpress_presses import kvpress_reference

from lcbench.cache.layer import DenseLayer
from lcbench.engine.runner import Engine, EngineConfig
from lcbench.errors import UserError
from lcbench.methods.base import LayerObservation
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.methods.registry import METHODS
from lcbench.models.tiny import tiny_llama

torch.set_num_threads(1)


def test_the_question_keeps_the_tokens_it_attends_to():
    n, q, d = 40, 3, 8
    gen = torch.Generator().manual_seed(0)
    keys = 0.01 * torch.randn(1, 1, n + q, d, generator=gen)
    queries = torch.zeros(1, 2, n + q, d)  # two query heads share the KV head
    targets = [7, 22, 31]
    for j, slot in enumerate(targets):  # question token j looks for key `slot`
        direction = torch.nn.functional.one_hot(torch.tensor(j), d).float() * 6.0
        keys[0, 0, slot] = direction
        queries[0, :, n + j] = direction
    layer = DenseLayer()
    layer.append(keys, torch.randn(1, 1, n + q, d, generator=gen), torch.arange(n + q)[None], None)
    seen = LayerObservation(layer_idx=0, num_layers=1, num_groups=2, context_length=n, protected=q, queries=queries)
    total = n + q
    stage = METHODS.get("finch")(ratio=1 - (len(targets) + q) / total)
    out = stage.compress_layer(layer, seen)
    assert kept_positions(out) == targets + list(range(n, n + q))


class DelimitedFinch(kvpress.FinchPress):
    """FinchPress as kvpress's pipeline drives it: the delimiter is cut from the embeddings, so the
    cache positions number the remaining tokens (the reference harness counts the ids with it)."""

    def forward_hook(self, module, args, kwargs, output):
        length = kwargs["hidden_states"].shape[1]
        return super().forward_hook(module, args, {**kwargs, "cache_position": torch.arange(length)}, output)


@pytest.fixture(scope="module")
def sdpa_model():
    return tiny_llama(layers=2)  # the lcbench fixture model's weights, plain SDPA


def test_keeps_kvpress_finchpress_positions_on_one_chunk(model, tok, sdpa_model):  # noqa: F811
    ctx = context_ids(tok)[:120]
    question = tok(" Question: what is the special magic number? Answer:", add_special_tokens=False)["input_ids"]
    if (len(ctx) + len(question)) % 2:
        ctx = ctx[:-1]  # (n + q) · 0.5 whole: kvpress's int() and lcbench's round() agree
    delimiter = next(i for i in range(len(tok)) if i not in set(ctx + question))  # an id the input lacks
    assert delimiter not in ctx + question
    press = DelimitedFinch(compression_ratio=0.5, rerotate_keys=False)
    press.delimiter_token_id = delimiter
    hook = sdpa_model.model.embed_tokens.register_forward_hook(press.embed_token_forward_hook)
    try:
        reference = kvpress_reference(sdpa_model, ctx + [delimiter] + question, press)
    finally:
        hook.remove()
    assert press.window_size == len(question)
    cache, _ = prefill(model, Chain.build(resolve_chain("finch", None, 0.5)), ctx + question, protected=len(question))
    for layer, (positions, values) in zip(cache.layers, reference):
        for head, expect in enumerate(positions):
            assert kept_positions(layer, head=head) == expect
        assert torch.allclose(layer.dense()[1][0].float(), values.float(), atol=1e-5)


def test_refused_without_query_aware_but_ratio_zero_runs(model, tok):  # noqa: F811
    with pytest.raises(UserError, match="--query-aware"):
        Engine(model, tok, Chain.build(resolve_chain("finch", None, 0.5)), EngineConfig())
    Engine(model, tok, Chain.build(resolve_chain("finch", None, 0.0)), EngineConfig())  # compresses nothing


def test_chunk_by_chunk_the_question_observes_every_chunk(model, tok):  # noqa: F811
    from tests.helpers import make_sample

    engine = Engine(model, tok, Chain.build(resolve_chain("finch", None, 0.5)),
                    EngineConfig(query_aware=True, prefill_chunk=32, compress_chunks=True))
    (record,) = engine.run(make_sample(1, max_new_tokens=4), False)
    assert record["context_tokens"] > 3 * 32
    assert abs(record["achieved_ratio"] - 0.5) < 0.03
