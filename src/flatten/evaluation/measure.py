"""Honest measurements: peak memory while something runs, and where it ran."""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn


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


class Stopwatch:
    """Seconds spent per named phase, summed over repeats: ``with watch("phase"): ...``; ``watch.seconds``.
    ``Stopwatch.synchronize``, where set (e.g. to ``torch.cuda.synchronize``), is called as each phase starts
    and ends, so that a phase is charged with the GPU work it queued rather than the next phase that waits."""

    synchronize: Callable[[], object] | None = None

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        synchronize = type(self).synchronize  # read on the class: a function stored there is not bound
        if synchronize is not None:
            synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if synchronize is not None:
                synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        return {phase: round(s, 2) for phase, s in self.seconds.items()}


def file_backed_fraction(model: nn.Module) -> float | None:
    """The share of ``model``'s parameter and buffer bytes in memory that lie in memory-mapped files (weights
    the kernel pages in from disk on use, rather than held in memory; tensors offloaded to the meta device are
    not counted); None where ``/proc/self/maps`` is missing."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    mapped = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((start, end))
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_meta:  # offloaded by accelerate: held by no one in this process until used
            continue
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    total = sum(storages.values())
    inside = sum(n for ptr, n in storages.items() if any(a <= ptr and ptr + n <= b for a, b in mapped))
    return inside / total if total else 0.0


def memory_budget(config, tokens: int, batch_tokens: int, weight_bytes: int = 2) -> dict[str, int]:
    """Bytes the compute device needs besides what it is given to hold of the model, by part, when
    ``Flattener(device=...)`` compresses a model of ``config`` on ``tokens`` calibration tokens: one wide
    block, one block boundary's activations (the Flattener holds up to three at once: the
    wide block's input and the two original blocks' outputs, its targets), the float64 statistics of a wide
    block (attention and MLP Gram matrices, MLP cross term), and the Cholesky factor of the MLP Gram matrix
    with two blocks of 1,024 of its columns while channels are selected; while merges are planned, the
    float32 inputs of every block for one batch of ``batch_tokens`` tokens (the block-input similarity).
    Weights of ``weight_bytes`` each (2 for bf16); activations in that dtype."""
    from flatten.models.architectures import architecture_for

    arch = architecture_for(config)
    shape = arch.shape_of(config)
    hidden = config.hidden_size
    attention_width, channels = 2 * shape.num_heads * shape.head_dim, 2 * shape.intermediate_size
    block = (hidden * (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim  # q, k, v
             + shape.num_heads * shape.head_dim * hidden + 3 * hidden * shape.intermediate_size)
    return {"wide block": 2 * block * weight_bytes,
            "activations (3 boundaries)": 3 * tokens * hidden * weight_bytes,
            "statistics": 8 * (attention_width**2 + channels**2 + channels * hidden),
            "channel selection": 8 * channels**2 + 2 * 8 * channels * 1024,
            "similarity (one batch)": 4 * config.num_hidden_layers * batch_tokens * hidden}


def machine() -> str:
    """One line naming the machine, for results tables."""
    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, {device}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")
