"""Honest measurements: peak memory while something runs, and where it ran."""

from __future__ import annotations

import os
import platform
import threading
import time

import torch


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak resident memory of this process (sampled every few ms) and peak CUDA memory, within a block.

        with PeakMemory() as memory:
            ...
        memory.peak_bytes, memory.baseline_bytes
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.baseline_bytes = self.peak_bytes = 0
        self.cuda_peak_bytes: int | None = None

    def __enter__(self) -> "PeakMemory":
        self.baseline_bytes = self.peak_bytes = _rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _rss_bytes())
        if torch.cuda.is_available():
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated()


def machine() -> str:
    """One line naming the machine, for results tables."""
    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, {device}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")
