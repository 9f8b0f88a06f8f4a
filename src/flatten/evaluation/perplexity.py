"""Perplexity on non-overlapping windows, returned with the protocol that produced it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flatten.models.dispatch import device_of


@dataclass(frozen=True)
class Perplexity:
    value: float
    seq_len: int
    windows: int
    tokens_scored: int
    text: str

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.2f} ({self.windows} x {self.seq_len} tokens of {self.text})"


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, *, seq_len: int = 512, max_windows: int | None = None,
               batch_size: int = 4, text: str = "given tokens", progress: bool = False) -> Perplexity:
    """Perplexity over consecutive non-overlapping windows of ``seq_len`` tokens; each window is scored
    on its own (its first token has no context), and a trailing partial window is dropped."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1:
        raise ValueError("token_ids must be a 1-D tensor of token ids")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    windows = token_ids.numel() // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise ValueError(f"{token_ids.numel()} tokens do not fill one window of {seq_len}")
    device = device_of(model)
    ids = token_ids[: windows * seq_len].view(windows, seq_len)
    total = 0.0
    for start in tqdm(range(0, windows, batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
    scored = windows * (seq_len - 1)
    return Perplexity(math.exp(total / scored), seq_len, windows, scored, text)


@torch.no_grad()
def mean_nll(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean next-token negative log-likelihood of ``model`` over batches of token ids (rows scored alone)."""
    device = device_of(model)
    total, count = 0.0, 0
    for ids in batches:
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count
