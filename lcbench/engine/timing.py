"""Wall-clock timing that synchronizes the device, and memory readings labelled by kind."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch


class Stopwatch:
    """Times code regions; on CUDA it synchronizes before reading the clock."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def region(self, into: dict, key: str):
        start = self.now()
        try:
            yield
        finally:
            into[key] = into.get(key, 0.0) + self.now() - start


class MemoryMeter:
    """Peak memory of a region: the CUDA allocator's peak on GPU; on CPU the process's peak
    resident set (Linux ``VmHWM``, reset at the region's start through ``/proc/self/clear_refs``),
    or, where that cannot be reset, the largest RSS sampled at stage ends. ``kind`` says which
    device, so tables label it."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.kind = "cuda_peak_allocated" if self.cuda else "cpu_rss"
        self.exact_cpu_peak = not self.cuda and _reset_hwm()
        self._peak_rss = 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.exact_cpu_peak:
            _reset_hwm()
        self._peak_rss = self._rss()

    def sample(self) -> None:
        """Record the current RSS (used where the kernel's peak cannot be reset)."""
        if not self.cuda:
            self._peak_rss = max(self._peak_rss, self._rss())

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
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
