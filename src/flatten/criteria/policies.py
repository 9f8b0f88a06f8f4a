"""Pair-selection policies and the similarity measures they read (METHOD.md section 4).

A policy looks at a similarity matrix of block inputs and at the current groups (spans of positions in that
matrix) and names the next adjacent pair of groups to flatten.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from flatten.registry import Registry

Span = tuple[int, int]  # first and last block of a group, inclusive

SIMILARITIES: Registry[Callable[[Tensor], Tensor]] = Registry("similarity measure")
SIMILARITIES.register("cosine", lambda cos: cos)
# ShortGPT-style angular distance, turned into a similarity: 1 - arccos(cos) / pi
SIMILARITIES.register("angular", lambda cos: 1 - torch.arccos(cos.clamp(-1, 1)) / math.pi)


class PairPolicy:
    """Chooses which adjacent groups to flatten next. ``recompute``: the Flattener recomputes the
    similarity matrix on the compressed model before every merge (positions are then current blocks).
    ``trial``: instead of similarities, ``next_merge`` receives for every adjacent pair of current blocks the
    calibration loss of the model with that pair merged (the Flattener tries each)."""

    recompute: bool = False
    trial: bool = False

    def next_merge(self, similarity: Tensor, groups: list[Span]) -> int:
        """Index ``g``: flatten group ``g`` with group ``g + 1``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GreedySimilarity(PairPolicy):
    """The paper's greedy merge: the adjacent groups whose merged span ``a..c`` has the most similar
    first and last block inputs, ``S[a, c]``. Ties go to the lower blocks. ``keep_last=n``: merge none of the
    last ``n`` blocks while other pairs are left (default 1; the paper's is 0). The input similarity does not
    see what the last block does to the output: on Qwen2.5-0.5B the last two blocks were a chosen pair, and
    keeping the last block out lowered the perplexity from 98.76 to 73.93 (``benchmarks/RESULTS.md``)."""

    def __init__(self, recompute: bool = False, keep_last: int = 1):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last must be an int >= 0, got {keep_last!r}")
        self.recompute, self.keep_last = recompute, keep_last

    def __repr__(self) -> str:
        return f"GreedySimilarity(recompute={self.recompute}, keep_last={self.keep_last})"

    def next_merge(self, similarity: Tensor, groups: list[Span]) -> int:
        if len(groups) < 2:
            raise ValueError("one group left: nothing to merge")
        pairs = range(len(groups) - 1)
        allowed = [g for g in pairs if groups[g + 1][1] < similarity.shape[0] - self.keep_last] or list(pairs)
        return max(allowed, key=lambda g: (float(similarity[groups[g][0], groups[g + 1][1]]), -g))


class FixedSpans(PairPolicy):
    """Flatten exactly the given spans of original blocks, e.g. ``[(20, 22), (25, 26)]`` (inclusive)."""

    def __init__(self, spans):
        try:
            spans = sorted((int(a), int(c)) for a, c in spans)
        except (TypeError, ValueError):
            raise TypeError(f"spans must be pairs of block indices (first, last), got {spans!r}") from None
        for (a, c), nxt in zip(spans, spans[1:] + [None]):
            if not 0 <= a < c:
                raise ValueError(f"span {(a, c)} must have 0 <= first < last")
            if nxt is not None and nxt[0] <= c:
                raise ValueError(f"spans {(a, c)} and {nxt} overlap")
        self.spans = spans

    def __repr__(self) -> str:
        return f"FixedSpans({self.spans})"

    @property
    def removes(self) -> int:
        return sum(c - a for a, c in self.spans)

    def next_merge(self, similarity: Tensor, groups: list[Span]) -> int:
        for g in range(len(groups) - 1):
            a, c = groups[g][0], groups[g + 1][1]
            if any(s <= a and c <= e for s, e in self.spans):
                return g
        raise ValueError(f"the fixed spans {self.spans} are all merged already (or lie beyond the model's blocks)")


class TrialLoss(PairPolicy):
    """Before each merge, try every adjacent pair of the current model (flatten, select, prune and
    compensate it on the first ``search_samples`` calibration sequences) and merge the pair whose model has
    the lowest loss on them; the chosen merge is then redone on the whole calibration set. With
    ``shortlist=n`` only the ``n`` pairs of most similar block inputs are tried. Costs one merge and about
    half a forward pass of the search set per pair tried, per merge."""

    recompute = True
    trial = True

    def __init__(self, search_samples: int = 4, shortlist: int | None = None):
        for name, value in (("search_samples", search_samples), ("shortlist", shortlist)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if search_samples is None:
            raise ValueError("search_samples must be a positive int, got None")
        self.search_samples, self.shortlist = search_samples, shortlist

    def __repr__(self) -> str:
        return f"TrialLoss(search_samples={self.search_samples}, shortlist={self.shortlist})"

    def next_merge(self, losses: Tensor, groups: list[Span]) -> int:
        if len(groups) < 2:
            raise ValueError("one group left: nothing to merge")
        return int(torch.as_tensor(losses).argmin())


POLICIES: Registry[Callable[..., PairPolicy]] = Registry("pair-selection policy")
POLICIES.register("greedy", lambda **options: GreedySimilarity(recompute=False, **options))
POLICIES.register("greedy-recompute", lambda **options: GreedySimilarity(recompute=True, **options))
POLICIES.register("fixed", FixedSpans)
POLICIES.register("trial-loss", TrialLoss)


def get_policy(policy: str | PairPolicy, **options) -> PairPolicy:
    if isinstance(policy, PairPolicy):
        if options:
            raise ValueError("options are only accepted with a policy name")
        return policy
    return POLICIES.get(policy)(**options)
