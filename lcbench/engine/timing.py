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
    """Peak memory of a region: the CUDA allocator's peak on GPU, the process RSS on CPU
    (``kind`` says which, so tables label it)."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.kind = "cuda_peak_allocated" if self.cuda else "cpu_rss"
        self._peak_rss = 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._peak_rss = self._rss()

    def sample(self) -> None:
        """Record the current RSS (CPU has no allocator peak; the engine samples at stage ends)."""
        if not self.cuda:
            self._peak_rss = max(self._peak_rss, self._rss())

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        self.sample()
        return self._peak_rss / 2**20

    @staticmethod
    def _rss() -> int:
        try:
            import psutil

            return psutil.Process(os.getpid()).memory_info().rss
        except Exception:  # psutil missing: fall back to /proc
            with open(f"/proc/{os.getpid()}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
