"""The GPU path, as far as a CPU can show it (issue #12): timing synchronizes, and memory is reset
and read on, the CUDA device(s) the model is on — cuda:N, or every device of a device_map —
never implicitly cuda:0; the spec records that device's name; one untimed warm-up runs before
the first sample. torch.cuda is replaced by a recorder here: nothing in this file needs a GPU."""

from types import SimpleNamespace

import pytest
import torch

from lcbench.engine import runner, timing
from lcbench.errors import UserError
from lcbench.models.loading import device_placement
from tests.conftest import engine_for
from tests.helpers import make_sample


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda calls recorded with the device each was given; cuda:3 is the current device."""
    calls: list[tuple[str, int]] = []
    peaks = {0: 5 * 2**20, 1: 7 * 2**20, 2: 11 * 2**20}

    def rec(name, result=None):
        def f(device=None):
            calls.append((name, torch.device(device).index))
            return result(torch.device(device).index) if result else None
        return f

    monkeypatch.setattr(torch.cuda, "synchronize", rec("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", rec("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", rec("peak", lambda i: peaks[i]))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"GPU-{i}")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: SimpleNamespace(total_memory=80 * 2**30))
    return calls


def test_cuda_n_is_synchronized_reset_and_read_on_that_device(fake_cuda):
    clock, meter = timing.Stopwatch("cuda:1"), timing.MemoryMeter(torch.device("cuda:1"))
    clock.now()
    meter.reset()
    assert meter.peak_mb() == 7.0 and meter.kind == "cuda_peak_allocated"
    assert fake_cuda == [("synchronize", 1), ("reset", 1), ("peak", 1)]


def test_a_device_map_is_measured_across_its_devices(fake_cuda):
    devices = [torch.device("cuda:2"), torch.device("cpu"), torch.device("cuda:0"), torch.device("cuda:2")]
    meter = timing.MemoryMeter(devices)
    meter.reset()
    assert meter.peak_mb() == 16.0  # each device's own peak, summed
    timing.Stopwatch(devices).now()
    assert [c for c in fake_cuda if c[0] == "synchronize"] == [("synchronize", 0), ("synchronize", 2)]
    assert timing.cuda_devices("cuda") == [torch.device("cuda:3")]  # "cuda" = the current device


def test_the_spec_names_the_device_the_run_used(fake_cuda):
    from lcbench.spec import provenance

    hw = provenance("cuda:2")["hardware"]
    assert hw["gpu"] == "GPU-2" and hw["gpu_index"] == 2 and hw["gpu_memory_gb"] == 80.0
    assert hw["gpus"] == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
    assert provenance("cuda")["hardware"]["gpu"] == "GPU-3"
    assert "gpu" not in provenance("cpu")["hardware"]


def test_cpu_engine_touches_no_cuda(fake_cuda, tiny):
    model, tok = tiny
    engine = engine_for(model, tok)
    engine.run(make_sample(1, max_new_tokens=2), False)
    assert engine.devices == [torch.device("cpu")] and fake_cuda == []


def test_one_untimed_warm_up_before_the_first_sample(tiny, monkeypatch):
    model, tok = tiny
    sample = make_sample(2, max_new_tokens=4)
    cold = engine_for(model, tok, "snapkv", 0.5, method_args="window_size=8")
    cold.warmed_up = True  # no warm-up: the reference records
    reference = cold.run(sample, False)
    passes: list[str] = []  # the run's passes carry the chain's stages; the warm-up's none
    real = runner.forward

    def spy(model, ids, positions, state, *args, **kwargs):
        passes.append("run" if state.stages else "warm-up")
        return real(model, ids, positions, state, *args, **kwargs)

    monkeypatch.setattr(runner, "forward", spy)
    engine = engine_for(model, tok, "snapkv", 0.5, method_args="window_size=8")
    first = engine.run(sample, False)
    second = engine.run(sample, False)
    assert passes[:3] == ["warm-up", "warm-up", "run"]  # a short prefill and one decode step, first
    assert passes.count("warm-up") == 2  # once per engine
    assert [r["prediction"] for r in first] == [r["prediction"] for r in second] == \
        [r["prediction"] for r in reference]


def test_device_map_needs_cuda():
    assert device_placement({}, "cpu") == {}
    with pytest.raises(UserError, match="device_map=auto"):
        device_placement({"device_map": "auto"}, "cpu")
