"""Hybrid models (Qwen3-Next, Qwen3.5, Jamba, Nemotron-H, ...): linear-attention / state-space layers
keep a fixed-size recurrent state (transformers' ``get_conv_state`` / ``update_recurrent_state``)
between attention layers. lcbench's cache holds those states as :class:`RecurrentLayer` s beside the
attention layers' KV, methods compress the attention layers only, the state's bytes are recorded
apart from the KV bytes a ratio is measured on, and the engine runs such a model one unpadded row
at a time (a padded token would enter the state)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lcbench.cache import KVCache
from lcbench.engine.batching import run_batched
from lcbench.engine.prompt import render
from lcbench.errors import UserError
from lcbench.models.families import build, family, tiny_config
from lcbench.models.tiny import tiny_tokenizer
from tests.conftest import engine_for
from tests.helpers import make_sample, records_by_method, saved_family, sharing_prefills
from tests.test_cli_errors import lcbench

warnings.filterwarnings("ignore", message=".*rope.*")
warnings.filterwarnings("ignore", message=".*falling back.*")


# gated DeltaNet (conv + delta rule) layers; Mamba layers; Mamba-2 beside attention in every layer;
# MiniMax's lightning attention, behind a cache type of its own (cache/model_caches.py)
@pytest.fixture(scope="module", params=["qwen3-next", "jamba", "falcon-h1", "minimax"])
def hybrid(request):
    """(lcbench model, transformers' reference with the same weights, tokenizer)."""
    from lcbench.engine.attach import use_lcbench_attention

    model = build(family(request.param), "eager")
    use_lcbench_attention(model)
    return model, build(family(request.param), "eager"), tiny_tokenizer()


def _generate(ref, ids: list[int], n: int) -> list[int]:
    out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def _until_eos(ids: list[int], tok) -> list[int]:
    return ids[: ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids


def test_turns_equal_generate_and_the_state_is_counted_apart_from_the_kv(hybrid):
    """`full` decodes every turn token-identical to model.generate, each turn one row; the record's
    kv_bytes are the attention layers' KV (the dense reference), and state_bytes the recurrent
    layers' states, as the probe measured them; snapkv halves the KV and leaves the state."""
    model, ref, tok = hybrid
    geometry = model.lcbench_geometry
    assert geometry.stateful and geometry.state_bytes > 0 and "state-space" in geometry.describe()
    assert all(geometry.bytes_per_token[i] == 0 for i in geometry.recurrent)
    sample = make_sample(n_turns=2, repeat=10, max_new_tokens=6)
    prompt = render(tok, sample, sample.context, False)
    records = engine_for(model, tok).run(sample, False)
    for k, r in enumerate(records):
        want = _generate(ref, prompt.context_ids + prompt.turn_ids[k], 6)
        assert r.decoded_ids == _until_eos(want, tok)
        assert r.measured.batch_rows == 1
        assert r.measured.state_bytes == geometry.state_bytes
        assert r.measured.kv_bytes == r.measured.kv_bytes_full == geometry.dense_bytes(len(prompt.context_ids))
    snap = engine_for(model, tok, "snapkv", 0.5, "window_size=8").run(sample, False)[0]
    assert 0.45 <= snap.measured.achieved_ratio <= 0.55
    assert snap.measured.state_bytes == geometry.state_bytes


def test_multi_turn_goes_back_to_each_question_and_equals_generate(hybrid):
    """SCBench multi-turn forgets each generated answer: a recurrent layer goes back to the state it
    held after the question (remembered when decoding began), so every turn equals model.generate on
    the context, earlier questions and gold answers, and this question."""
    _multi_turn_equals_generate(*hybrid)


def test_an_attention_block_shared_by_layers_caches_each_layers_own_kv():
    """Zamba2 runs one attention module (``layer_idx = -1``) in each of its hybrid layers, passing
    the layer's index to ``cache.update``: lcbench attends the layer the block just cached, so the
    probe sees each layer once and multi-turn equals model.generate."""
    from lcbench.engine.attach import use_lcbench_attention

    model = build(family("zamba2"), "eager")
    use_lcbench_attention(model)
    assert model.lcbench_geometry.recurrent == (0,) and model.lcbench_geometry.stateful == (0, 1)
    _multi_turn_equals_generate(model, build(family("zamba2"), "eager"), tiny_tokenizer(), turns=2)


def _multi_turn_equals_generate(model, ref, tok, turns: int = 3) -> None:
    sample = make_sample(n_turns=turns, repeat=8, max_new_tokens=5)
    prompt = render(tok, sample, sample.context, True)
    records = engine_for(model, tok).run(sample, True)
    assert len(records) == turns
    for k, r in enumerate(records):
        ids = prompt.context_ids + [t for part in prompt.turn_ids[:k + 1] for t in part]
        assert r.decoded_ids == _until_eos(_generate(ref, ids, 5), tok), k


def test_samples_asked_to_batch_run_one_unpadded_row_each_as_alone(hybrid):
    """--batch-size N on a hybrid: no sample shares a padded prefill and no turns a padded question
    batch (the padding would enter the state); records equal each sample alone."""
    from lcbench.evaluate import _produce

    model, _, tok = hybrid
    samples = [make_sample(n_turns=2, repeat=10, max_new_tokens=5, sid="a"),
               make_sample(n_turns=1, repeat=6, max_new_tokens=5, sid="b")]
    alone = [r for s in samples for r in engine_for(model, tok, "snapkv", 0.5, "window_size=8").run(s, False)]
    engine = engine_for(model, tok, "snapkv", 0.5, "window_size=8", decode_rows=4)
    batched = [r for _, records in _produce(engine, samples, {}, 4, False) for r in records]
    assert [r.decoded_ids for r in batched] == [r.decoded_ids for r in alone]
    assert {(r.measured.batch_rows, r.measured.batch_samples) for r in batched} == {(1, 1)}
    with pytest.raises(RuntimeError, match="padded rows"):  # the engine's own batching is never handed one
        list(run_batched(engine, samples, {}, 4))


def test_runs_sharing_a_prefill_on_a_hybrid_equal_each_alone(hybrid):
    """Runs sharing one prefill (engine/shared_prefill.py) copy the recurrent layers untouched and
    compress the attention layers; each run's records equal the run alone."""
    model, _, tok = hybrid
    runs = [("snapkv", 0.5, "window_size=8"), ("kivi", 0.5, "group_size=8"), ("full", 0.0, None)]
    sample = make_sample(n_turns=2, repeat=10, max_new_tokens=5)
    alone = [engine_for(model, tok, n, r, a).run(sample, False) for n, r, a in runs]
    engines = sharing_prefills([engine_for(model, tok, n, r, a) for n, r, a in runs])
    shared = [e.run(sample, False) for e in engines]
    for got, want in zip(shared, alone):
        assert [r.decoded_ids for r in got] == [r.decoded_ids for r in want]
        assert [r.measured.kv_bytes for r in got] == [r.measured.kv_bytes for r in want]
        assert all(r.measured.shared_prefill for r in got)


def test_a_recurrent_state_goes_back_only_to_the_last_prompt_part_and_takes_no_padding():
    from lcbench.cache.recurrent import RecurrentLayer
    from lcbench.engine.decode import forward
    from lcbench.engine.state import DECODE, ForwardState

    model = build(family("qwen3.5"), "eager")
    from lcbench.engine.attach import use_lcbench_attention

    use_lcbench_attention(model)
    cache = KVCache(2)
    state = ForwardState(cache=cache, stages=[])
    with torch.inference_mode():
        forward(model, torch.arange(1, 7)[None], torch.arange(6)[None], state)  # a prompt part: 6 tokens
        forward(model, torch.arange(1, 4)[None], torch.arange(6, 9)[None], state)  # another: 3 tokens
        after_prompt = cache.layers[0].recurrent_states[0].clone()
        state.phase = DECODE
        forward(model, torch.tensor([[5]]), torch.tensor([[9]]), state)  # a generated token
    layer = cache.layers[0]
    assert isinstance(layer, RecurrentLayer) and layer.seq_len() == 10
    assert cache.state_nbytes() > 0 and layer.nbytes() == 0
    assert not torch.equal(layer.recurrent_states[0], after_prompt)
    with pytest.raises(RuntimeError, match="cannot go back from 10 to 7"):
        layer.crop_to(7)
    cache.crop_to([9, 9])
    assert torch.equal(layer.recurrent_states[0], after_prompt) and layer.seq_len() == 9
    copy = layer.repeat_rows(2)
    assert copy.recurrent_states[0].shape[0] == 2 and copy.recurrent_states[0].data_ptr() != after_prompt.data_ptr()
    with pytest.raises(RuntimeError, match="padded rows"):
        cache.set_incoming(torch.tensor([[9, 10]]), torch.tensor([[False, True]]))


@pytest.mark.parametrize("method", ["kvzip", "simlayerkv", "duoattention"])
def test_methods_that_take_every_layer_for_attention_are_refused_on_hybrids(hybrid, method):
    """Refused where some layers have no attention; where every layer has attention beside its mixer
    (Falcon-H1) they run and reach the ratio."""
    model, _, tok = hybrid
    if not model.lcbench_geometry.recurrent:
        record = engine_for(model, tok, method, 0.5).run(make_sample(n_turns=1, repeat=10, max_new_tokens=3), False)[0]
        assert record.measured.achieved_ratio >= 0.45
        return
    with pytest.raises(UserError, match="linear-attention / state-space layers") as err:
        engine_for(model, tok, method, 0.5)
    assert "Fix:" in str(err.value)


def test_a_target_compressor_scores_on_a_copy_of_the_recurrent_state(hybrid):
    """Prompt compressors that condition on the target model (LLMLingua, Selective Context) score
    continuations without committing them: on a hybrid the state cannot be cropped back, so scoring
    runs on a copy and leaves the session as it was."""
    from lcbench.methods.prompt.lm import CompressorLM, Session

    model, _, tok = hybrid
    session = Session(CompressorLM(model, tok, "target", 512), list(range(3, 40)))
    probe = list(range(50, 70))
    first, again = session.score(probe), session.score(probe)
    assert torch.allclose(first, again)
    assert torch.allclose(session.commit(probe), first)
    if not model.lcbench_geometry.stepwise:  # Jamba's PyTorch Mamba path continues a state inexactly
        fresh = Session(CompressorLM(model, tok, "target", 512), list(range(3, 40)) + probe)
        assert torch.allclose(fresh.score([7, 8, 9]), session.score([7, 8, 9]), atol=1e-4)


def test_architecture_refusals_name_what_the_config_shows():
    from lcbench.models.hook import config_refusal

    mamba = config_refusal(tiny_config(family("mamba")))
    assert "no attention layer" in mamba and "Fix:" in mamba
    assert config_refusal(tiny_config(family("falcon-h1"))) is None  # attention beside the mixer: runs


def test_cli_runs_a_hybrid_checkpoint_and_refuses_what_cannot_run(tmp_path):
    """What a user runs on a local Qwen3-Next checkpoint: full and snapkv exit 0 sharing one prefill,
    with state_bytes beside kv_bytes; kvzip exits 2 naming the reason, no traceback."""
    folder = saved_family(tmp_path / "qwen3-next", "qwen3-next")
    common = ["--model", str(folder), "--ratio", "0.5", "--task", "niah", "--limit", "1",
              "--task-args", "lengths=320,depths=50,max_new_tokens=4"]
    proc = lcbench("run", *common, "--method", "full,snapkv", "--output-path", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = records_by_method(tmp_path / "out")
    assert sorted(records) == ["full", "snapkv"]
    for rows in records.values():
        assert rows and rows[0]["measured"]["state_bytes"] > 0
    assert records["snapkv"][0]["measured"]["achieved_ratio"] > 0.45
    bad = lcbench("run", *common, "--method", "kvzip", "--output-path", str(tmp_path / "bad"))
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "state-space" in bad.stderr and "Fix:" in bad.stderr and "Traceback" not in bad.stderr
