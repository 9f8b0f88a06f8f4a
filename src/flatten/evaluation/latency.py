"""Inference latency: prefill (one forward over the prompt) and decode (one token a step, with the KV cache)."""

from __future__ import annotations

import inspect
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from flatten.checks import check_int


@dataclass(frozen=True)
class Latency:
    batch: int
    prompt: int  # prompt tokens per sequence
    new_tokens: int  # decode steps timed, after the prefill
    prefill_ms: float  # median over repeats, whole batch
    decode_ms: float  # median over repeats of the mean time of one decode step, whole batch
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_name(model: nn.Module) -> str:
    """The keyword of the KV cache in ``model.forward``: ``cache`` from transformers 5.2x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def _one_run(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    device, name = ids.device, _cache_name(model)
    synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{name: getattr(out, name)})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    return prefill, (time.perf_counter() - start) / new_tokens


def measure_latency(model: nn.Module, *, batch: int = 1, prompt: int = 128, new_tokens: int = 32, repeats: int = 3,
                    seed: int = 0) -> Latency:
    """Median prefill time and per-step decode time of greedy generation from random prompts (after one
    warm-up run), on the device where the model is. Prompts are random token ids: latency does not depend
    on which tokens they are."""
    return compare_latency([model], batch=batch, prompt=prompt, new_tokens=new_tokens, repeats=repeats, seed=seed)[0]


@dataclass(frozen=True)
class Ratio:
    """The median of paired time ratios (one model over another, from runs interleaved A, B, A, B, ...) and a
    distribution-free interval of that median (order statistics) with its coverage. Not resolved where the
    interval holds 1.0 (or too few pairs give it 90 % coverage): the machine's noise could then explain the
    difference."""

    median: float
    low: float
    high: float
    coverage: float
    pairs: int

    @property
    def resolved(self) -> bool:
        return self.coverage >= 0.9 and not self.low <= 1.0 <= self.high

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}]" + ("" if self.resolved else " not resolved")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, ratios: list[float]) -> "Ratio":
        """From paired ratios: the widest order-statistic interval of the median with coverage of at least
        95 % (the full range where too few pairs give that; its coverage is then less)."""
        n, ordered = len(ratios), sorted(ratios)

        def below(k: int) -> float:  # P(Binomial(n, 1/2) < k)
            return sum(math.comb(n, i) for i in range(k)) / 2**n

        k = max([k for k in range(1, n // 2 + 1) if 1 - 2 * below(k) >= 0.95] or [1])
        return cls(statistics.median(ratios), ordered[k - 1], ordered[n - k], 1 - 2 * below(k), n)


def latency_ratios(after: nn.Module, before: nn.Module, *, batch: int = 1, prompt: int = 128, new_tokens: int = 32,
                   repeats: int = 9, seed: int = 0) -> tuple[Latency, Latency, Ratio, Ratio]:
    """Latency of ``after`` and ``before`` from ``repeats`` interleaved pairs of runs, and the after / before
    ratios of prefill and of decode with their spread (``Ratio``)."""
    runs = _interleaved([after, before], batch, prompt, new_tokens, repeats, seed)
    latencies = [_median_latency(r, batch, prompt, new_tokens, repeats) for r in runs]
    prefill = Ratio.of([a[0] / b[0] for a, b in zip(*runs)])
    decode = Ratio.of([a[1] / b[1] for a, b in zip(*runs)])
    return latencies[0], latencies[1], prefill, decode


def compare_latency(models: list[nn.Module], *, batch: int = 1, prompt: int = 128, new_tokens: int = 32,
                    repeats: int = 3, seed: int = 0) -> list[Latency]:
    """``measure_latency`` for several models, their runs interleaved (A, B, A, B, ...) so that a shared
    machine's changing speed affects them alike. The models must share a vocabulary."""
    runs = _interleaved(models, batch, prompt, new_tokens, repeats, seed)
    return [_median_latency(r, batch, prompt, new_tokens, repeats) for r in runs]


def _median_latency(runs: list[tuple[float, float]], batch: int, prompt: int, new_tokens: int, repeats: int) -> Latency:
    return Latency(batch, prompt, new_tokens, 1000 * statistics.median(p for p, _ in runs),
                   1000 * statistics.median(d for _, d in runs), repeats)


def _interleaved(models: list[nn.Module], batch: int, prompt: int, new_tokens: int, repeats: int,
                 seed: int) -> list[list[tuple[float, float]]]:
    """``(prefill s, decode s per step)`` of every run, per model, after one warm-up run of each."""
    for name, value in (("batch", batch), ("prompt", prompt), ("new_tokens", new_tokens), ("repeats", repeats)):
        check_int(name, value)
    vocab = min(m.get_input_embeddings().num_embeddings for m in models)
    ids = torch.randint(vocab, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    inputs = [ids.to(next(m.parameters()).device) for m in models]
    for model, x in zip(models, inputs):
        _one_run(model, x, min(new_tokens, 4))
    runs: list[list[tuple[float, float]]] = [[] for _ in models]
    for _ in range(repeats):
        for model, x, record in zip(models, inputs, runs):
            record.append(_one_run(model, x, new_tokens))
    return runs
