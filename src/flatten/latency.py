"""Inference latency: prefill (one forward over the prompt) and decode (one token a step, with the KV cache)."""

from __future__ import annotations

import inspect
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


def compare_latency(models: list[nn.Module], *, batch: int = 1, prompt: int = 128, new_tokens: int = 32,
                    repeats: int = 3, seed: int = 0) -> list[Latency]:
    """``measure_latency`` for several models, their runs interleaved (A, B, A, B, ...) so that a shared
    machine's changing speed affects them alike. The models must share a vocabulary."""
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
    return [Latency(batch, prompt, new_tokens, 1000 * statistics.median(p for p, _ in r),
                    1000 * statistics.median(d for _, d in r), repeats) for r in runs]
