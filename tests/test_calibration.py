"""The calibration hook (lcbench/engine/calibration.py): a stage's per-model work runs once, is cached
on disk keyed by the model's identity and the method's parameters, reaches the stage before the first
sample, and is what a later engine (or process) reads back instead of computing again."""

from __future__ import annotations

import pytest
import torch

from lcbench.engine.calibration import calibration_key
from lcbench.engine.runner import Engine
from lcbench.methods.base import Stage
from lcbench.methods.chain import Chain
from lcbench.methods.dropping.select import keep_top
from lcbench.models.tiny import tiny_llama, tiny_tokenizer
from lcbench.params import Param
from lcbench.tasks.sample import Sample, Turn

torch.set_num_threads(1)


class KeepCalibratedHeadOrder(Stage):
    """Calibrates a per-model result checkable by hand (the embedding norms of a probe text and the
    layer count); compresses by keeping the earliest tokens, after checking it got its calibration."""

    name = "calibrated_probe"
    family = "kv_dropping"
    paper = "test"
    params = (Param("probe_words", int, 8, "words in the probe"), Param("unused", int, 0, "not calibrated"))
    calibration_params = ("probe_words",)
    calls = 0

    def calibrate(self, model, tokenizer):
        type(self).calls += 1
        ids = tokenizer(" ".join(["probe"] * self.args["probe_words"]), return_tensors="pt")["input_ids"]
        hidden = model.model.embed_tokens(ids)
        return {"norm": hidden.norm(dim=-1)[0], "layers": model.config.num_hidden_layers}

    def compress_layer(self, layer, seen):
        assert self.calibration is not None and self.calibration["layers"] == seen.num_layers
        n = seen.context_length
        return keep_top(layer, -layer.positions[..., :n].float(), self.ratio, seen)


@pytest.fixture()
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LCBENCH_CACHE", str(tmp_path))
    KeepCalibratedHeadOrder.calls = 0
    return tmp_path


def engine(model, **args) -> Engine:
    return Engine(model, tiny_tokenizer(), Chain([KeepCalibratedHeadOrder(ratio=0.5, **args)], 0.5))


def test_calibration_runs_once_per_model_and_reaches_the_stage(cache_home):
    model = tiny_llama(seed=0)
    first = engine(model)
    (cal,) = first.calibrations
    assert cal.computed and KeepCalibratedHeadOrder.calls == 1
    assert (cache_home / "calibration" / "calibrated_probe" / f"{cal.key}.pt").is_file()
    stage = first.chain.stages[0]
    assert stage.calibration["layers"] == 2 and stage.calibration["norm"].shape == (len(tiny_tokenizer()(
        " ".join(["probe"] * 8))["input_ids"]),)
    again = engine(model, unused=3)  # a parameter the calibration does not depend on: same file
    assert not again.calibrations[0].computed and again.calibrations[0].key == cal.key
    assert KeepCalibratedHeadOrder.calls == 1
    assert torch.equal(again.chain.stages[0].calibration["norm"], stage.calibration["norm"])
    records = again.run(Sample(id="s", context="one two three four five six seven eight nine ten " * 3,
                               turns=[Turn(question="Which?", answers=["x"], max_new_tokens=3, scorer="x")]), False)
    assert records[0].measured.achieved_ratio > 0.3  # the stage compressed, reading its calibration


def test_other_weights_or_calibrated_parameters_calibrate_again(cache_home):
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    stage = KeepCalibratedHeadOrder(ratio=0.5)
    assert calibration_key(a, stage) != calibration_key(b, stage)  # same config, other weights
    assert calibration_key(a, stage) != calibration_key(a, KeepCalibratedHeadOrder(ratio=0.5, probe_words=9))
    assert calibration_key(a, stage) == calibration_key(a, KeepCalibratedHeadOrder(ratio=0.9))  # ratio not named
    engine(a)
    engine(b)
    assert KeepCalibratedHeadOrder.calls == 2


def test_a_corrupt_cache_file_is_recomputed(cache_home):
    model = tiny_llama(seed=0)
    (cal,) = engine(model).calibrations
    with open(cal.path, "wb") as f:
        f.write(b"not a torch file")
    (again,) = engine(model).calibrations
    assert again.computed and KeepCalibratedHeadOrder.calls == 2


def test_an_unwritable_cache_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("LCBENCH_CACHE", str(blocked))  # the cache folder cannot be made under a file
    KeepCalibratedHeadOrder.calls = 0
    with pytest.warns(UserWarning, match="could not be cached.*LCBENCH_CACHE"):
        (cal,) = engine(tiny_llama(seed=0)).calibrations
    assert cal.computed and KeepCalibratedHeadOrder.calls == 1
