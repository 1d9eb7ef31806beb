"""Batching across samples: contexts of different lengths prefilled together (left-padded),
compressed per sample and decoded as one batch give the same token ids, kept bytes and kept
tokens as running each sample alone (batch size 1)."""

import json

import pytest
import torch

from lcbench.cache.layer import DenseLayer
from lcbench.engine.batching import batch_refusal, plan_groups, run_batched
from lcbench.engine.row_stack import StackedLayer, row_layers, stack_rows, take_rows
from lcbench.evaluate import build_spec, evaluate
from lcbench.results import read_records
from tests.conftest import engine_for
from tests.helpers import decoded_ids, make_sample

# (turns, filler repeats): contexts of different lengths, some samples with several turns
SHAPES = [(1, 12), (2, 9), (1, 11), (3, 10), (1, 12)]


def _samples():
    return [make_sample(n_turns=t, repeat=r, max_new_tokens=10, sid=f"s{i}") for i, (t, r) in enumerate(SHAPES)]


def _alone(model, tok, method, ratio, args):
    engine = engine_for(model, tok, method, ratio, method_args=args, decode_rows=1)
    return decoded_ids(lambda: [r for s in _samples() for r in engine.run(s, False)])


def _together(model, tok, method, ratio, args, rows=8):
    engine = engine_for(model, tok, method, ratio, method_args=args, decode_rows=rows)
    assert batch_refusal(engine.chain, False, False) is None
    return decoded_ids(lambda: [r for _, recs in run_batched(engine, _samples(), {}, rows) for r in recs])


@pytest.mark.parametrize("method,ratio,args", [
    ("full", 0.0, None),
    ("snapkv", 0.5, "window_size=8"),   # window attention, pooled scores, padded budgets
    ("chunkkv", 0.5, None),             # per-sample state across layers (index reuse)
    ("adakv", 0.5, None),               # ragged heads: rows of another layer kind
    ("snapkv+kivi", 0.7, None),         # a chain ending in packed quantized storage
])
def test_cross_sample_batch_is_token_identical_to_batch_size_one(tiny, method, ratio, args):
    model, tok = tiny
    ids_alone, rec_alone = _alone(model, tok, method, ratio, args)
    ids_batch, rec_batch = _together(model, tok, method, ratio, args)
    assert set(ids_batch) == set(ids_alone) and len(ids_alone) == 8
    assert ids_batch == ids_alone
    assert all(len(t) > 0 for t in ids_alone.values())
    for key, alone in rec_alone.items():
        got = rec_batch[key]
        for field in ("prediction", "kv_bytes", "kept_tokens", "achieved_ratio", "input_tokens", "kv_bytes_full"):
            assert got[field] == alone[field], (key, field)
    assert max(r["batch_samples"] for r in rec_batch.values()) >= 3  # samples really shared a batch
    assert max(r["batch_rows"] for r in rec_batch.values()) > 1


def test_rows_limit_splits_groups_and_turns(tiny):
    """With 2 rows a batch, the 3-turn sample decodes in two batches; still identical."""
    model, tok = tiny
    ids_alone, _ = _alone(model, tok, "snapkv", 0.5, "window_size=8")
    ids_batch, rec = _together(model, tok, "snapkv", 0.5, "window_size=8", rows=2)
    assert ids_batch == ids_alone
    assert max(r["batch_rows"] for r in rec.values()) == 2


def test_plan_groups_longest_first_within_rows_and_padding():
    sizes = [(100, 1), (400, 1), (390, 2), (380, 1), (120, 1), (395, 6)]
    # 400,395 (7 rows), and 390 would make 9 → a new group; 120 pads 390/380/120 by 24% (≤ 25%), but
    # 100 would pad that group by 37% → a group of its own
    assert plan_groups(sizes, rows=8) == [[1, 5], [2, 3, 4], [0]]
    assert plan_groups(sizes, rows=1) == [[1], [5], [2], [3], [4], [0]]
    assert plan_groups([(100, 1), (10, 1)], rows=8, max_padding=0.4) == [[0], [1]]  # 45% padding
    assert plan_groups([(100, 1), (60, 1)], rows=8, max_padding=0.4) == [[0, 1]]  # 20% padding


def test_refusals_name_the_reason(tiny):
    model, tok = tiny
    assert "multi-turn" in batch_refusal(engine_for(model, tok).chain, True, False)
    assert "query-aware" in batch_refusal(engine_for(model, tok).chain, False, True)
    assert "decode stage" in batch_refusal(engine_for(model, tok, "streamingllm", 0.5).chain, False, False)
    assert "carries state" in batch_refusal(engine_for(model, tok, "qfilters", 0.5).chain, False, False)
    assert batch_refusal(engine_for(model, tok, "qfilters", 0.5, method_args="calibration_samples=0").chain,
                         False, False) is None


def _dense(length: int, start: int = 0) -> DenseLayer:
    layer = DenseLayer()
    keys = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1).expand(1, 2, length, 3) + start
    layer.append(keys, keys + 0.5, torch.arange(length)[None], None)
    return layer


def test_stacked_rows_left_pad_and_split_back():
    a, b = _dense(3), _dense(5, start=100)
    stacked = stack_rows([a, b])
    assert type(stacked) is DenseLayer and stacked.keys.shape == (2, 2, 5, 3)
    assert stacked.valid[0, 0].tolist() == [False, False, True, True, True]
    assert stacked.positions[0, 0].tolist() == [0, 0, 0, 1, 2]
    back = row_layers(stacked)
    assert torch.equal(back[0].keys, a.keys) and torch.equal(back[1].values, b.values)
    assert back[0].nbytes() == a.nbytes()
    taken = take_rows(stacked, [2, 0])  # row 0 twice; row 1 gone, and so are the columns only it used
    assert taken.keys.shape == (2, 2, 3, 3) and taken.valid is None


def test_stacked_layer_of_other_kinds_appends_per_row():
    from lcbench.cache.quantized import QuantizedLayer, QuantSpec

    spec = QuantSpec(bits=8, key_axis="token", group_size=3, window=2)
    a = QuantizedLayer.from_layer(_dense(6), spec)
    b = _dense(4)
    stacked = stack_rows([a, b])
    assert isinstance(stacked, StackedLayer) and stacked.seq_len() == 6
    new = torch.ones(2, 2, 1, 3)
    stacked.append(new, new, torch.tensor([[6], [4]]), None)
    keys, _ = stacked.dense()
    assert keys.shape == (2, 2, 7, 3)
    assert stacked.positions[1, 0].tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert stacked.valid[1, 0].tolist() == [False, False, True, True, True, True, True]
    assert stacked.nbytes() == a.nbytes() + b.nbytes()
    assert [r.seq_len() for r in row_layers(stacked)] == [7, 5]


def test_run_folder_identical_to_batch_size_one_and_resumes(tmp_path):
    """Through ``evaluate``: same predictions as batch size 1; a partial folder resumes batched."""
    args = dict(model="tiny-random-llama", method="snapkv", method_args="window_size=8", ratio=0.5, task="niah",
                task_args="lengths=320;400,depths=0;50;100,max_new_tokens=8", device="cpu")
    one = evaluate(build_spec(**args, batch_size=1, output_path=str(tmp_path / "one")))
    batched = build_spec(**args, batch_size="auto", output_path=str(tmp_path / "many"))
    assert batched.run_id == one.spec.run_id  # batching changes how, not what
    first = evaluate(batched)
    lines = (first.folder / "samples.jsonl").read_text().splitlines()
    (first.folder / "samples.jsonl").write_text("\n".join(lines[:2]) + "\n")
    again = evaluate(batched)
    assert again.new_records == len(lines) - 2
    by_key = {}
    for folder in (one.folder, first.folder):
        for r in read_records(folder):
            by_key.setdefault((r["sample_id"], r["turn"]), []).append(r)
    assert len(by_key) == 6 and all(len(v) == 2 for v in by_key.values())
    for alone, together in by_key.values():
        assert together["prediction"] == alone["prediction"] and together["kv_bytes"] == alone["kv_bytes"]
    assert max(r[1]["batch_samples"] for r in by_key.values()) > 1


def test_default_runs_one_sample_at_a_time_with_its_turns_together(tmp_path):
    """``--batch-size turns`` (the default): latencies are one request's (no sample shares a
    prefill) and every turn of a sample decodes in one batch, however many turns it has."""
    spec = build_spec(model="tiny-random-llama", method="snapkv", method_args="window_size=8", ratio=0.5,
                      task="scbench_kv_synth", task_args="length=500,num_samples=3,num_turns=3,mode=multi_request",
                      device="cpu", limit=3, output_path=str(tmp_path))
    assert spec.batch_size == "turns"
    out = evaluate(spec)
    records = read_records(out.folder)
    assert len(records) == 9
    assert {r["batch_samples"] for r in records} == {1}
    assert {r["batch_rows"] for r in records} == {3}


def test_tables_mark_latency_measured_on_cross_sample_batches(tmp_path):
    """A run batched across samples has its TTFT, tok/s and memory marked † with a footnote in
    both the run table and the report tables; a per-request run is not marked."""
    from rich.console import Console

    from lcbench.report.frame import load_runs, records_frame
    from lcbench.report.grouped import grouped_table
    from lcbench.report.table import render_table, run_rows

    args = dict(model="tiny-random-llama", ratio=0.0, task="niah",
                task_args="lengths=320,depths=0;50;100,max_new_tokens=4", device="cpu", output_path=str(tmp_path))
    evaluate(build_spec(**args, method="full", batch_size=4))
    evaluate(build_spec(**args, method="random"))  # default: one sample at a time
    console = Console(record=True, width=200)
    render_table(run_rows([tmp_path]), console)
    text = console.export_text()
    full_row = next(line for line in text.splitlines() if "│ full " in line)
    random_row = next(line for line in text.splitlines() if "│ random " in line)
    assert full_row.count("†") == 3 and "†" not in random_row
    assert "batches of 3 samples" in text and "--batch-size turns" in text
    table = grouped_table(records_frame(load_runs([tmp_path])), "dataset")
    marked = table.display.set_index("method")
    assert marked.loc["full", "TTFT s"].endswith("†") and not marked.loc["random", "TTFT s"].endswith("†")
    assert "batches of 3 samples" in table.note
