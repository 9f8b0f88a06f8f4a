"""What the benchmark scripts share: the model, calibration set and perplexity protocol of one run."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flatten import perplexity
from flatten.data import CORPORA, calibration_description, evaluation_tokens, wikitext2_test_path
from flatten.evaluation.latency import synchronize
from flatten.run.pipeline import Calibration, load


@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: object
    calibration: torch.Tensor
    evaluations: dict[str, torch.Tensor]  # evaluation corpus name -> its first tokens
    seq_len: int
    windows: int
    protocol: str  # the calibration and perplexity protocol, in words

    def perplexities(self, model: torch.nn.Module) -> dict[str, float]:
        """Perplexity of ``model`` on each evaluation corpus."""
        return {name: perplexity(model, ids, seq_len=self.seq_len, max_windows=self.windows).value
                for name, ids in self.evaluations.items()}

    def windows_of(self, name: str) -> int:
        """How many windows of ``seq_len`` the perplexity on ``name`` scores (fewer than ``windows`` where the
        text is shorter)."""
        return min(self.evaluations[name].numel() // self.seq_len, self.windows)

    def ppl(self, model: torch.nn.Module) -> float:
        """Perplexity on the first evaluation corpus (WikiText-2 unless chosen otherwise)."""
        name, ids = next(iter(self.evaluations.items()))
        return perplexity(model, ids, seq_len=self.seq_len, max_windows=self.windows).value


def setup(model_name: str, samples: int, seq_len: int, windows: int, calibration: str = "default",
          evaluations: tuple[str, ...] = ("wikitext2",)) -> Setup:
    """The model, ``samples`` x ``seq_len`` calibration tokens of ``calibration`` (a mix or corpus of
    ``flatten.data``, or a text file) and the first ``windows`` windows of each evaluation corpus."""
    torch.manual_seed(0)
    model, tokenizer = load(model_name)
    ids, _ = Calibration(calibration, samples=samples, seq_len=seq_len).tokens(tokenizer)
    if "wikitext2" in evaluations and wikitext2_test_path() is None:
        sys.exit("needs the WikiText-2 test split at ../shared/data/wikitext-2-raw/wiki.test.raw")
    texts = {name: evaluation_tokens(tokenizer, name, windows * seq_len) for name in evaluations}
    protocol = (f"Calibration: {samples} x {seq_len} tokens of {calibration_description(calibration)} (seed 0). "
                f"Perplexity: the first {windows} non-overlapping windows of {seq_len} tokens of "
                + "; ".join(f"{name} ({CORPORA.get(name).domain}: {CORPORA.get(name).source})" for name in evaluations)
                + ".")
    return Setup(model, tokenizer, ids, texts, seq_len, windows, protocol)


def code_version() -> dict:
    """The git commit of the code that ran, and whether tracked files differed from it (``dirty``); Nones where
    the code is not in a git work tree."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


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
