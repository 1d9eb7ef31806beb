"""Wall-clock timing that synchronizes the devices a model runs on, and memory readings labelled
by kind — on the CUDA device(s) the model was placed on (``--device cuda:N``, or every device of
an accelerate ``device_map``), never implicitly on ``cuda:0``."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch


def cuda_devices(devices) -> list[torch.device]:
    """The CUDA devices among ``devices`` (one or several), each with its index made explicit
    (``cuda`` = the current device), in a stable order without repeats."""
    if isinstance(devices, (str, torch.device)):
        devices = [devices]
    out: list[torch.device] = []
    for d in devices:
        d = torch.device(d)
        if d.type != "cuda":
            continue
        d = torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device())
        if d not in out:
            out.append(d)
    return sorted(out, key=lambda d: d.index)


def model_devices(model) -> list[torch.device]:
    """Every device holding a parameter or buffer of ``model`` (several with a ``device_map``)."""
    seen: list[torch.device] = []
    for t in (*model.parameters(), *model.buffers()):
        if t.device not in seen:
            seen.append(t.device)
    return seen or [torch.device("cpu")]


def input_device(model) -> torch.device:
    """Where a forward pass takes its inputs: the input embeddings' device (the first of a
    ``device_map``; accelerate's hooks move activations between the others)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def device_hardware(device: str | None) -> dict:
    """The accelerator a run used, for the spec's provenance: the name (and memory) of the CUDA
    device ``device`` names (``cuda`` = the current one), every visible GPU when there are several
    (a ``device_map`` may use them all); GPU 0 when CUDA is there and no device is given."""
    if not torch.cuda.is_available():
        return {}
    if device is None:
        index = 0
    elif torch.device(device).type == "cuda":
        index = cuda_devices(device)[0].index
    else:
        return {}
    props = torch.cuda.get_device_properties(index)
    out = {"gpu": torch.cuda.get_device_name(index), "gpu_index": index,
           "gpu_memory_gb": round(props.total_memory / 2**30, 1)}
    if torch.cuda.device_count() > 1:
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


class Stopwatch:
    """Times code regions; on CUDA it synchronizes every device the model uses before reading the clock."""

    def __init__(self, devices):
        self.devices = cuda_devices(devices)
        self.cuda = bool(self.devices)

    def now(self) -> float:
        for d in self.devices:
            torch.cuda.synchronize(d)
        return time.perf_counter()

    @contextmanager
    def region(self, into: dict, key: str):
        start = self.now()
        try:
            yield
        finally:
            into[key] = into.get(key, 0.0) + self.now() - start


class MemoryMeter:
    """Peak memory of a region: on GPU the CUDA allocator's peak on each device the model uses,
    summed over them (one device: its peak; a ``device_map``: the sum of every device's own peak,
    what the run needed across them); on CPU the process's peak resident set (Linux ``VmHWM``,
    reset at the region's start through ``/proc/self/clear_refs``), or, where that cannot be
    reset, the largest RSS sampled at stage ends. ``kind`` says which, so tables label it."""

    def __init__(self, devices):
        self.devices = cuda_devices(devices)
        self.cuda = bool(self.devices)
        self.kind = "cuda_peak_allocated" if self.cuda else "cpu_rss"
        self.exact_cpu_peak = not self.cuda and _reset_hwm()
        self._peak_rss = 0

    def reset(self) -> None:
        for d in self.devices:
            torch.cuda.reset_peak_memory_stats(d)
        if not self.cuda and self.exact_cpu_peak:
            _reset_hwm()
        self._peak_rss = self._rss()

    def sample(self) -> None:
        """Record the current RSS (used where the kernel's peak cannot be reset)."""
        if not self.cuda:
            self._peak_rss = max(self._peak_rss, self._rss())

    def peak_mb(self) -> float:
        if self.cuda:
            return sum(torch.cuda.max_memory_allocated(d) for d in self.devices) / 2**20
        self.sample()
        if self.exact_cpu_peak:
            return max(self._peak_rss, _hwm()) / 2**20
        return self._peak_rss / 2**20

    @staticmethod
    def _rss() -> int:
        try:
            import psutil

            return psutil.Process(os.getpid()).memory_info().rss
        except Exception:  # psutil missing: fall back to /proc
            with open(f"/proc/{os.getpid()}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux ≥ 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _hwm() > 0
    except OSError:
        return False


def _hwm() -> int:
    """This process's peak resident set in bytes since the last reset (0 where unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
