"""What the benchmark scripts share: the model, calibration set and perplexity protocol of one run."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from flatten import load_model, perplexity
from flatten.data import LINE_JOIN, calibration_tokens, read_lines, tokenize, wikitext2_test_path
from flatten.latency import synchronize


@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: object
    calibration: torch.Tensor
    ppl: Callable[[torch.nn.Module], float]  # WikiText-2 test perplexity of a model
    protocol: str  # the calibration and perplexity protocol, in words


def setup(model_name: str, samples: int, seq_len: int, windows: int) -> Setup:
    torch.manual_seed(0)
    model, tokenizer = load_model(model_name)
    calibration = calibration_tokens(tokenizer, samples=samples, seq_len=seq_len)
    text = wikitext2_test_path()
    if text is None:
        sys.exit("needs the WikiText-2 test split at ../shared/data/wikitext-2-raw/wiki.test.raw")
    eval_ids = tokenize(tokenizer, read_lines(text), max_tokens=windows * seq_len)

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, eval_ids, seq_len=seq_len, max_windows=windows).value

    protocol = (f"Calibration: {samples} x {seq_len} tokens of Wikipedia lead sections (seed 0). Perplexity: first "
                f"{windows} non-overlapping windows of {seq_len} tokens of WikiText-2 test (`{text.name}`, non-empty "
                f"lines joined by {LINE_JOIN!r}).")
    return Setup(model, tokenizer, calibration, ppl, protocol)


def publish(lines: list[str], append: str | None) -> None:
    """Print a markdown section and, with ``append``, add it to the end of that file."""
    section = "\n".join(lines) + "\n"
    print("\n" + section)
    if append:
        with open(append, "a") as f:
            f.write("\n" + section)


def forward_seconds(model: torch.nn.Module, calibration: torch.Tensor, batch_size: int) -> float:
    """One forward pass of ``model`` over the calibration set (the best of two, after a warm-up batch)."""
    best, device = float("inf"), next(model.parameters()).device
    calibration = calibration.to(device)
    with torch.no_grad():
        model(input_ids=calibration[:1], use_cache=False)
        for _ in range(2):
            synchronize(device)
            start = time.perf_counter()
            for ids in calibration.split(batch_size):
                model(input_ids=ids, use_cache=False)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    return best


def plan_agreement(a, b, channels: float) -> tuple[dict[str, bool], float]:
    """Whether two compressions of one model decided alike: the same spans, the same KV groups, and at least
    ``channels`` of the MLP channels shared at every merge; with the smallest share found (0 if spans differ)."""
    checks = {"same spans": [m.span for m in a.merges] == [m.span for m in b.merges]}
    shared = 0.0
    if checks["same spans"]:
        checks["same KV groups"] = all(x.keep_groups == y.keep_groups for x, y in zip(a.merges, b.merges))
        shared = min(len(set(x.keep_channels) & set(y.keep_channels)) / len(x.keep_channels)
                     for x, y in zip(a.merges, b.merges))
        checks[f"MLP channels shared >= {channels:.0%} at every merge"] = shared >= channels
    return checks, shared
