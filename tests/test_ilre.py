"""ILRe (lcbench/methods/dropping/ilre.py): multi-size pooling recalls isolated peaks and whole spans;
only the recalled tokens (and the question) are prefilled, at their true positions; the retrieval
layer is calibrated once per model, recorded in spec.json and read back by the next run."""

from __future__ import annotations

import json

import pytest
import torch
from test_dropping import make_sample, model, tok  # noqa: F401  (fixtures)

from lcbench.engine.runner import Engine, EngineConfig
from lcbench.errors import UserError
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.methods.dropping.ilre import recall
from tests.test_cli_errors import SMALL_NIAH, TINY, lcbench

torch.set_num_threads(1)


def test_narrow_kernel_recalls_peaks_and_wide_kernel_their_neighbours():
    scores = torch.zeros(60)
    scores[10], scores[40] = 5.0, 4.0  # two isolated peaks
    scores[41:44] = 0.5  # the peak's span at 40 goes on a little
    assert recall(scores, 2, [1]).tolist() == [10, 40]
    # kernel 1 takes the two peaks; kernel 3 then takes the neighbours its pooled peaks reach first
    got = recall(scores, 6, [1, 3]).tolist()
    assert {10, 40} <= set(got) and len(got) == 6
    assert set(got) - {10, 40} <= {9, 11, 39, 41, 42, 43}
    assert recall(scores, 60, [1, 7]).tolist() == list(range(60))  # everything: no kernel double-counts


def test_only_the_recalled_tokens_are_prefilled_at_true_positions(model, tok):  # noqa: F811
    engine = Engine(model, tok, Chain.build(resolve_chain("ilre", "layer=0", 0.5)), EngineConfig(query_aware=True))
    sample = make_sample(turns=1)
    p = engine.prepare(sample, False)
    ctx, question = p.prompt.context_ids, p.prompt.turn_ids[0]
    prefilled = engine.prefill([ctx + question], protected=len(question))
    n, q = len(ctx), len(question)
    for layer in prefilled.cache.layers:
        pos = layer.positions[0, 0]
        assert pos[-q:].tolist() == list(range(n, n + q))  # the question, whole
        assert len(pos) - q == round((n + q) * 0.5) - q  # the recalled context: the ratio over both
        assert bool((pos[:-q].diff() > 0).all()) and int(pos[:-q].max()) < n
    assert prefilled.compress_s > 0  # the partial-depth recall pass is the method's compression time
    (record,) = engine.run(sample, False)
    assert abs(record["achieved_ratio"] - 0.5) < 0.02 and record.method_stats["ilre_layer"] == 0


def test_bad_layer_and_missing_question_are_refused(model, tok):  # noqa: F811
    with pytest.raises(UserError, match="--query-aware"):
        Engine(model, tok, Chain.build(resolve_chain("ilre", "layer=0", 0.5)), EngineConfig())
    engine = Engine(model, tok, Chain.build(resolve_chain("ilre", "layer=5", 0.5)), EngineConfig(query_aware=True))
    with pytest.raises(UserError, match="layer=5 but the model has 2 layers"):
        engine.run(make_sample(turns=1), False)


def test_calibrated_layer_is_recorded_and_reused_by_the_next_run(tmp_path):
    env = {"LCBENCH_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "results"
    first = lcbench("run", *TINY, "--method", "ilre", "--method-args", "probe_tokens=64", "--query-aware",
                    "--task-args", SMALL_NIAH, "--output-path", str(out), env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    second = lcbench("run", *TINY, "--method", "ilre", "--method-args", "probe_tokens=64", "--query-aware",
                     "--ratio", "0.25", "--task-args", SMALL_NIAH, "--output-path", str(out), env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    cals = {}
    for spec_file in out.glob("*/spec.json"):
        payload = json.loads(spec_file.read_text())
        (cal,) = payload["calibration"]
        cals[payload["spec"]["ratio"]] = cal
    assert cals[0.5]["method"] == "ilre" and cals[0.5]["computed"] is True
    assert cals[0.25]["computed"] is False and cals[0.25]["key"] == cals[0.5]["key"]  # the ratio is not calibrated
    assert (tmp_path / "cache" / "calibration" / "ilre" / f"{cals[0.5]['key']}.pt").is_file()
