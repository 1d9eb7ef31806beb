"""Long generation (issue #17): decode-time eviction of generated tokens (StreamingLLM, H2O, TOVA),
the cache measured at the end of decoding (``kv_bytes_end``), multi-turn crops after generated
tokens were evicted, and the ``long_output`` task (seeded generator, exact-answer scorer, GSM8K
through the hub stand-in), with real ``lcbench run`` spawns."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcbench.cache.layer import DenseLayer
from lcbench.cache.ragged import RaggedLayer
from lcbench.engine.attach import use_lcbench_attention
from lcbench.engine.runner import Engine, EngineConfig
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.methods.dropping.decode_eviction import EvictingLayer
from lcbench.methods.registry import METHODS
from lcbench.models.tiny import tiny_llama, tiny_tokenizer
from lcbench.tasks.long_output import LongOutput, extract_answer, gsm8k_answer, problems, steps_on_track
from lcbench.tasks.base import TaskEnv
from lcbench.tasks.sample import Sample, Turn

torch.set_num_threads(1)  # the machine is shared; one thread is steadier (as tests/test_dropping.py)

GENERATED = 210  # tokens decoded (EOS masked), far more than the compressed prompt holds
CONTEXT = "Read this. " + " ".join(f"The magic number is {i * 7919 % 1000}." for i in range(12))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(layers=2)
    use_lcbench_attention(m)
    return m


def chain(method: str, ratio: float, args: str | None = None) -> Chain:
    return Chain.build(resolve_chain(method, args, ratio), ratio)


def long_turn(n: int = GENERATED, question: str = "Question: count on. Answer:") -> Turn:
    return Turn(question=question, answers=["x"], max_new_tokens=n, scorer="x", min_new_tokens=n)


def positions(layer, head: int = 0) -> list[int]:
    pos, valid = layer.positions[0, head], layer.valid
    if valid is not None:
        pos = pos[valid[0, head]]
    return sorted(pos.tolist())


def decode_long(model, tok, method: str, ratio: float, args: str | None = None, n: int = GENERATED):
    """Prefill CONTEXT compressed, decode ``n`` tokens; the cache afterwards and the sizes."""
    engine = Engine(model, tok, chain(method, ratio, args), EngineConfig())
    sample = Sample("s", CONTEXT, [long_turn(n)], chat=False)
    p = engine.prepare(sample)
    cache = engine.prefill([p.prompt.context_ids]).cache
    ctx, q = len(p.prompt.context_ids), len(p.prompt.turn_ids[0])
    kept = cache.seq_lengths()
    decoded = engine.decode(cache, [p.prompt.turn_ids[0]], ctx, [sample.turns[0]])
    return cache, decoded.outputs[0], ctx, q, kept, engine


# --- StreamingLLM ----------------------------------------------------------------------------
def test_streamingllm_rolls_over_generated_tokens_sinks_and_last_window(model, tok):
    cache, out, ctx, q, kept, engine = decode_long(model, tok, "streamingllm", 0.5)
    assert len(out.tokens) == GENERATED
    size = kept[0] + q  # the cache when decoding began: kept context + question
    assert size < GENERATED  # so the window must have rolled over generated tokens
    assert cache.seq_lengths() == [size] * len(kept)  # bounded at its size for all 210 steps
    last = ctx + q + GENERATED - 2  # position of the last token fed back (the final one is not)
    for layer in cache.layers:
        for head in range(layer.positions.shape[1]):
            assert positions(layer, head) == [0, 1, 2, 3] + list(range(last - size + 5, last + 1))
    assert min(positions(cache.layers[0])[4:]) > ctx + q  # no context, question or early output left
    assert out.end.kv_bytes == cache.nbytes() and out.end.kept_tokens == size


def test_streamingllm_without_evict_generated_grows_once_the_prompt_is_gone(model, tok):
    cache, out, ctx, q, kept, _ = decode_long(model, tok, "streamingllm", 0.5, "evict_generated=false")
    fed = GENERATED - 1
    assert cache.seq_lengths() == [4 + fed] * len(kept)  # sinks + every generated token: the old behaviour
    assert positions(cache.layers[0]) == [0, 1, 2, 3] + list(range(ctx + q, ctx + q + fed))


# --- kv_bytes_end in the records -------------------------------------------------------------
def test_kv_bytes_end_grows_with_full_and_stays_at_the_budget_with_eviction(model, tok):
    sample = Sample("s", CONTEXT, [long_turn()], chat=False)
    full = Engine(model, tok, chain("full", 0.0)).run(sample, multi_turn=False)[0].measured
    bpt = Engine(model, tok, chain("full", 0.0)).bytes_per_token
    q = full.input_tokens - full.context_tokens
    assert full.kv_bytes_end == full.kv_bytes + (q + GENERATED - 1) * bpt  # every generated token held
    assert full.kept_tokens_end == full.input_tokens + GENERATED - 1
    for method in ("streamingllm", "h2o", "tova"):
        m = Engine(model, tok, chain(method, 0.5)).run(sample, multi_turn=False)[0].measured
        assert m.decode_tokens == GENERATED
        assert m.kv_bytes_end == m.kv_bytes + q * bpt, method  # the size decoding began with
        assert m.kv_bytes_end < full.kv_bytes_end / 2, method


def test_ratio_zero_is_full_token_identical_over_a_long_decode(model, tok):
    sample = Sample("s", CONTEXT, [long_turn()], chat=False)
    full = Engine(model, tok, chain("full", 0.0)).run(sample, multi_turn=False)[0].decoded_ids
    assert len(full) == GENERATED
    for method in ("streamingllm", "h2o", "tova"):
        assert Engine(model, tok, chain(method, 0.0)).run(sample, multi_turn=False)[0].decoded_ids == full, method


# --- H2O and TOVA on constructed keys --------------------------------------------------------
def constructed_decode(stage, steps: int, heavy_step: int, dim: int = 8, start: int = 6):
    """A one-row, one-KV-head (two query heads) layer of ``start`` prompt slots, decoded ``steps``
    steps with random small keys, except the token fed at ``heavy_step`` whose key lines up with
    every query (a heavy hitter). Returns the layer."""
    gen = torch.Generator().manual_seed(0)
    layer = DenseLayer()
    layer.append(0.1 * torch.randn(1, 1, start, dim, generator=gen), torch.randn(1, 1, start, dim, generator=gen),
                 torch.arange(start)[None], None)
    direction = torch.ones(dim) / dim ** 0.5
    for step in range(steps):
        key = 0.1 * torch.randn(1, 1, 1, dim, generator=gen)
        if step == heavy_step:
            key = 6 * direction.view(1, 1, 1, dim)
        layer.append(key, torch.randn(1, 1, 1, dim, generator=gen), torch.tensor([[start + step]]), None)
        query = (3 * direction + 0.1 * torch.randn(dim, generator=gen)).expand(1, 2, 1, dim)
        layer = stage.after_decode_step(layer, 0, query)
    return layer


def h2o_stage(recent: int, evict_generated: bool = True):
    stage = METHODS.get("h2o")(ratio=0.5, evict_generated=evict_generated)
    stage.begin_sample()
    stage._accumulated[0], stage._recent[0], stage._scaling[0] = torch.zeros(1, 1, 6), recent, 1.0
    return stage


def test_h2o_keeps_a_generated_heavy_hitter_and_the_recent_window_evicting_other_generated_tokens():
    layer = constructed_decode(h2o_stage(recent=3), steps=40, heavy_step=2)
    kept = positions(layer)
    assert layer.seq_len() == 6  # the size decoding began with, after 40 steps
    assert 6 + 2 in kept  # the generated heavy hitter survived 37 later steps
    assert kept[-3:] == [6 + 37, 6 + 38, 6 + 39]  # the recent window
    assert len([p for p in kept if p >= 6]) >= 4  # generated tokens compete with prompt ones (34+ went)
    old = constructed_decode(h2o_stage(recent=3, evict_generated=False), steps=40, heavy_step=2)
    assert positions(old)[-40:] == list(range(6, 46))  # the old rule: generated tokens are never evicted


def test_tova_drops_the_least_attended_token_keeping_the_heavy_hitter():
    stage = METHODS.get("tova")(ratio=0.5)
    stage.begin_sample()
    stage._scaling[0] = 1.0
    layer = constructed_decode(stage, steps=40, heavy_step=2)
    assert layer.seq_len() == 6 and 6 + 2 in positions(layer)  # bounded; the heavy hitter kept
    old = METHODS.get("tova")(ratio=0.5, evict_generated=False)
    old.begin_sample()
    old._scaling[0] = 1.0
    assert positions(constructed_decode(old, steps=40, heavy_step=2)) == list(range(6, 46))  # prompt gone, output kept


# --- multi-turn ------------------------------------------------------------------------------
def test_crop_after_generated_evictions_forgets_exactly_the_answer():
    layer = DenseLayer()
    layer.append(torch.randn(1, 2, 8, 2), torch.randn(1, 2, 8, 2), torch.arange(8)[None], None)
    for step in range(6):  # evict slot 1 (a prompt slot) twice, then generated tokens, per head apart
        layer.append(torch.randn(1, 2, 1, 2), torch.randn(1, 2, 1, 2), torch.tensor([[8 + step]]), None)
        layer = EvictingLayer.wrap(layer)
        priority = torch.zeros(1, 2, layer.seq_len())
        priority[..., :] = 1.0
        target = 1 if step < 2 else (layer.seq_len() - 2 if step % 2 else layer.seq_len() - 3)
        priority[0, 0, target] = 0.0
        priority[0, 1, 1 if step < 4 else layer.seq_len() - 2] = 0.0
        layer.evict(priority)
    layer.crop_to(8)  # the engine's multi-turn crop: the 8 slots before the answer
    assert isinstance(layer.inner, RaggedLayer)  # head 0 lost 2 prompt slots, head 1 lost 4
    assert positions(layer, 0) == [0, 3, 4, 5, 6, 7]
    assert positions(layer, 1) == [0, 5, 6, 7]
    layer.append(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), torch.tensor([[20, 21]]), None)
    assert positions(layer, 1) == [0, 5, 6, 7, 20, 21]  # the next turn's question reaches every head
    # the next turn decodes on the ragged layer: per-slot statistics stay aligned with the slots
    layer.tracks["pos"] = layer.positions.float()
    for step in range(4):
        layer.append(torch.randn(1, 2, 1, 2), torch.randn(1, 2, 1, 2), torch.tensor([[22 + step]]), None)
        layer = EvictingLayer.wrap(layer)
        layer.tracks["pos"][..., -1] = 22 + step
        layer.evict(torch.rand(1, 2, layer.seq_len(), generator=torch.Generator().manual_seed(step)))
        valid = layer.valid if layer.valid is not None else torch.ones_like(layer.positions, dtype=torch.bool)
        assert torch.equal(layer.tracks["pos"][valid], layer.positions[valid].float())
        for h in (0, 1):  # arrival indices follow the slots too (storage order = arrival order)
            arrived = layer.arrival[0, h][valid[0, h]]
            assert bool((arrived[1:] > arrived[:-1]).all())
    assert [len(positions(layer, h)) for h in (0, 1)] == [8, 6]  # one in, one out per step


@pytest.mark.parametrize("method", ["streamingllm", "h2o", "tova"])
def test_multi_turn_forgets_each_answer_after_evicting_generated_tokens(model, tok, method):
    """As Engine.run_multi_turn does: decode a long answer, crop; no generated position is left."""
    engine = Engine(model, tok, chain(method, 0.5), EngineConfig())
    sample = Sample("s", CONTEXT, [long_turn(80, f"Question {k}: go on. Answer:") for k in range(3)], chat=False)
    p = engine.prepare(sample, multi_turn=True)
    cache = engine.prefill([p.prompt.context_ids]).cache
    position = len(p.prompt.context_ids)
    for k, turn in enumerate(sample.turns):
        lengths = cache.seq_lengths()
        q = len(p.prompt.turn_ids[k])
        engine.decode(cache, [p.prompt.turn_ids[k]], position, [turn])
        answer = set(range(position + q, position + q + 80))
        before = [[set(positions(layer, h)) for h in range(layer.positions.shape[1])] for layer in cache.layers]
        assert len(before[0][0] & answer) < 79  # generated tokens were evicted (79 were fed)
        cache.crop_to([min(n + q, layer.seq_len()) for n, layer in zip(lengths, cache.layers)])
        for layer, heads in zip(cache.layers, before):
            for head, held in enumerate(heads):
                assert set(positions(layer, head)) == held - answer  # the answer forgotten, the rest kept
        position += q
    recs = engine.run(sample, multi_turn=True)
    assert [r.turn for r in recs] == [0, 1, 2] and all(r.measured.decode_tokens == 80 for r in recs)


# --- the long_output task ----------------------------------------------------------------------
def test_generator_is_deterministic_and_its_solutions_are_right():
    a, b, c = problems(3, 5, 20), problems(3, 5, 20), problems(4, 5, 20)
    assert a == b and a != c
    for p in a:
        lines = p.solution.splitlines()
        assert len(lines) == 22 and lines[-1] == f"Answer: {p.answer}"
        value = int(re.search(r"starts with (\d+)", lines[0]).group(1))
        for line in lines[1:-1]:
            x, op, y, z = re.match(r"Step \d+: (\d+) ([-+*/]) (\d+) = (\d+)\.", line).groups()
            assert int(x) == value
            value = {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y), "/": int(x) // int(y)}[op]
            assert value == int(z) and 1 <= value <= 9999
        assert value == p.answer
    env = TaskEnv(tokenizer=tiny_tokenizer(), model_name="m", model_max_length=10 ** 6, seed=3)
    samples = LongOutput(samples=5, steps=20, shots=2).samples(env)
    assert [s.turns[0].answers for s in samples] == [[str(p.answer)] for p in a]
    assert samples[0].context == samples[1].context and "Answer: " in samples[0].context
    assert samples[0].turns[0].max_new_tokens == 768


@pytest.mark.parametrize("prediction,score,strict", [
    ("Step 1: 3 + 4 = 7.\nAnswer: 5,880.", 1.0, 1.0),
    ("Step 1: 5880 - 1 = 5879.\nanswer:  5880\nProblem: next", 1.0, 1.0),
    ("Answer: 588", 0.0, 0.0),
    ("so it is 12 then 5880", 1.0, 0.0),  # no Answer line: the last number
    ("Answer: 12. Later 5880", 0.0, 0.0),  # the first Answer line counts
    ("no number", 0.0, 0.0),
])
def test_scorer_is_exact_on_known_strings(prediction, score, strict):
    turn = Turn("q", ["5880"], 10, "exact_number")
    got = LongOutput().score(Sample("s", "", [turn]), turn, prediction)
    assert got["score"] == score and got["strict"] == strict
    assert extract_answer("Answer: -3.5")[0] == -3.5


def test_steps_on_track_counts_the_gold_values_reproduced_in_order():
    values = (20, 10, 5, 15)
    assert steps_on_track("Step 1: Mia starts with 20 coins.\nStep 2: 20 / 2 = 10.\nStep 3: 10 / 2 = 5.\n"
                          "Step 4: 5 + 10 = 15.\nAnswer: 15", values) == 1.0
    assert steps_on_track("Step 1: Mia starts with 20.\nStep 2: 20 / 2 = 10.\nStep 3: 10 - 2 = 8.\n"
                          "Step 4: 5 + 10 = 15.", values) == 0.5  # on track until step 3
    assert steps_on_track("The answer is 15", values) == 0.0
    (problem,) = problems(0, 1, 12)
    turn = LongOutput(samples=1, steps=12, shots=0).samples(
        TaskEnv(tokenizer=tiny_tokenizer(), model_name="m", model_max_length=10 ** 6))[0].turns[0]
    assert LongOutput().score(Sample("s", "", [turn]), turn, problem.solution) == {
        "score": 1.0, "strict": 1.0, "answer_found": 1.0, "steps_on_track": 1.0}


def test_gsm8k_answers_and_a_local_copy(tmp_path):
    text, value = gsm8k_answer("She has 2*3 = <<2*3=6>>6 eggs.\n#### 1,234")
    assert value == 1234 and text == "She has 2*3 = 6 eggs.\nAnswer: 1234"
    rows = [{"question": f"Q{i}?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(3)]
    for split in ("test", "train"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    env = TaskEnv(tokenizer=tiny_tokenizer(), model_name="m", model_max_length=10 ** 6)
    samples = LongOutput(source="gsm8k", data_dir=str(tmp_path), shots=2).samples(env)
    assert [s.turns[0].answers for s in samples] == [["1"], ["2"], ["3"]]
    assert "Problem: Q1?\nSolution:\n1 + 1 = 2\nAnswer: 2" in samples[0].context and "Q2?" not in samples[0].context


# --- real processes --------------------------------------------------------------------------
def lcbench(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=300, env=env)


def records(root: Path) -> list[dict]:
    (path,) = root.glob("*/samples.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_long_output_streamingllm_records_the_end_cache(tmp_path):
    proc = lcbench(["run", "--task", "long_output", "--method", "streamingllm", "--ratio", "0.5", "--model",
                    "tiny-random-llama", "--limit", "1", "--task-args",
                    "shots=2,steps=8,max_new_tokens=250,min_new_tokens=250", "--output-path", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    (rec,) = records(tmp_path)
    m = rec["measured"]
    assert m["decode_tokens"] == 250 and rec["scores"]["score"] in (0.0, 1.0)
    bpt = m["kv_bytes_full"] // m["context_tokens"]
    assert m["kv_bytes_end"] == m["kv_bytes"] + (m["input_tokens"] - m["context_tokens"]) * bpt  # bounded
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert "kv_bytes_end" in json.dumps(summary)


def test_cli_long_output_reads_gsm8k_through_the_hub_client(tmp_path):
    """source=gsm8k against the loopback hub stand-in (huggingface_hub's real client)."""
    import pandas as pd

    sys.path.insert(0, str(Path(__file__).parent))
    from hubserver import HubRepo, StandIn

    def parquet(rows):
        buf = io.BytesIO()
        pd.DataFrame(rows).to_parquet(buf)
        return buf.getvalue()

    rows = [{"question": f"Tom has {i} pens and buys 2. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
            for i in range(3)]
    files = {"main/test-00000-of-00001.parquet": parquet(rows), "main/train-00000-of-00001.parquet": parquet(rows)}
    server = StandIn(repos={"openai/gsm8k": HubRepo(files, "a" * 40)}).start()
    try:
        env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DISABLE_XET": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        proc = lcbench(["run", "--task", "long_output", "--method", "full", "--model", "tiny-random-llama",
                        "--limit", "2", "--task-args", "source=gsm8k,shots=1,max_new_tokens=4",
                        "--output-path", str(tmp_path / "out")], env)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    recs = records(tmp_path / "out")
    assert [r["answers"] for r in recs] == [["2"], ["3"]]
    assert recs[0]["meta"]["dataset"] == "long_output_gsm8k"
