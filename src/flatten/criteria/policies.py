"""Pair-selection policies, and the similarity measures they read.

A policy decides what the ``Flattener`` does next. It sees the compression through a ``SearchState``: the
spans of original blocks that the current blocks hold, how many blocks are still to go, and signals it asks
for (and pays for) when it needs them: the block-input similarity of the original or of the current model,
each block's influence, and the calibration loss of the model after a trial merge or drop. It answers with
``Step``s: flatten and prune a pair of adjacent blocks, or drop one block.

A policy that knows its whole plan at once (the paper's greedy merge, fixed spans) returns every step that
remains, lowest position first, so that the ``Flattener`` walks the blocks once, bottom-up. An adaptive
policy returns one step and is asked again on the changed model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from flatten.checks import TOKENS, check_choice, check_int
from flatten.registry import Registry

Span = tuple[int, int]  # first and last original block held by a block, inclusive

SIMILARITIES: Registry[Callable[[Tensor], Tensor]] = Registry("similarity measure")
SIMILARITIES.register("cosine", lambda cos: cos)
# ShortGPT-style angular distance, turned into a similarity: 1 - arccos(cos) / pi
SIMILARITIES.register("angular", lambda cos: 1 - torch.arccos(cos.clamp(-1, 1)) / math.pi)

KINDS = ("merge", "drop", "absorb")


@dataclass(frozen=True)
class Step:
    """One block fewer: ``"merge"`` flattens current blocks ``position`` and ``position + 1`` into one and
    prunes it back to the original width (the scorer chooses what to keep); ``"drop"`` deletes current block
    ``position``; ``"absorb"`` deletes it too, but the block before it (after it, for block 0) keeps its
    attention as it is and its MLP's ``down_proj`` is refitted by the scorer to compute what the two blocks
    computed (ReplaceMe's idea, with the refit of FlattenGPT's pruning). A merge of ``count`` blocks flattens
    blocks ``position`` .. ``position + count - 1`` into one wide block and prunes it back once: ``count - 1``
    blocks fewer."""

    kind: str
    position: int
    count: int = 2

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"a step's kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if isinstance(self.position, bool) or not isinstance(self.position, int) or self.position < 0:
            raise ValueError(f"a step's position must be a block index >= 0, got {self.position!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 2:
            raise ValueError(f"a step's count must be an int >= 2 (blocks that become one), got {self.count!r}")
        if self.count != 2 and self.kind != "merge":
            raise ValueError(f"only a merge flattens more than two blocks; a {self.kind} removes one block")

    @property
    def removes(self) -> int:
        return self.count - 1

    def __str__(self) -> str:
        if self.kind != "merge":
            return f"{self.kind} {self.position}"
        return f"merge {self.position}" + "".join(f"+{self.position + i}" for i in range(1, self.count))


def pair_of(step: Step, count: int) -> tuple[int, str | None]:
    """The pair of blocks (its first position) that ``step`` turns into one block in a model of ``count``
    blocks, and which block's groups and channels it keeps (None: the scorer chooses). A drop or an absorb
    of block ``i`` keeps the other block of a pair: the one before it (the one after it for block 0 in an
    absorb, or for the last block in a drop). A merge of more blocks starts at its position too."""
    i, last = step.position, count - (step.count if step.kind == "merge" else 1)
    if not i <= last or count < 2:
        raise ValueError(f"cannot {step} in a model of {count} blocks")
    if step.kind == "merge":
        return i, None
    if step.kind == "drop":
        return (i, "second") if i < count - 1 else (i - 1, "first")
    return (i - 1, "first") if i > 0 else (0, "second")


class SearchState(Protocol):
    """What a policy may ask of the compression in progress (the ``Flattener`` provides it)."""

    spans: list[Span]  # for each current block, the original blocks it holds
    removed: int  # blocks removed so far
    remaining: int  # blocks still to remove

    def original_similarity(self) -> Tensor:
        """Block-input similarity of the original model (original blocks x original blocks)."""

    def similarity(self) -> Tensor:
        """Block-input similarity of the model as it is now (current blocks x current blocks)."""

    def influence(self) -> Tensor:
        """ShortGPT's block influence of each current block, ``1 - cos(input, output)`` per token, averaged
        over the search sequences."""

    def cut_distances(self, k: int, tokens: str = "all") -> Tensor:
        """For each start ``s``, the mean angular distance between the inputs of current blocks ``s`` and
        ``s + k`` (``s + k`` = the number of blocks: the last block's output) on the calibration set."""

    def trial_losses(self, steps: list[Step]) -> list[float]:
        """The mean NLL on the search sequences of the model after each step on its own (merges and absorbs
        built on the other calibration sequences); the blocks below a step are not run again (prefix replay)."""


class PairPolicy:
    """Decides the next steps. Subclasses implement ``next_steps``."""

    def next_steps(self, state: SearchState) -> list[Step]:
        """The next steps, in the order they are to be taken: at least one, removing at most
        ``state.remaining`` blocks in all. Positions are those of the model when the step is taken (each step
        removes one block; a merge of ``count`` blocks removes ``count - 1``)."""
        raise NotImplementedError

    @property
    def adaptive(self) -> bool:
        """Whether the steps depend on the model as it changes (then a dry run cannot show them)."""
        return True

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def steps_towards(spans: list[Span], groups: list[Span]) -> list[Step]:
    """The merges, lowest position first, that turn blocks holding ``spans`` into blocks holding ``groups``
    (each group a union of adjacent spans)."""
    steps, i = [], 0
    for position, (a, c) in enumerate(groups):
        inside = 0
        while i < len(spans) and spans[i][1] <= c:
            if spans[i][0] < a:
                break
            inside, i = inside + 1, i + 1
        if inside == 0 or spans[i - 1][1] != c:
            raise ValueError(f"the blocks now hold spans {spans}, which do not divide into the planned {groups}")
        steps += [Step("merge", position)] * (inside - 1)
    if i != len(spans):
        raise ValueError(f"the blocks now hold spans {spans}, which do not divide into the planned {groups}")
    return steps


class OneShot(PairPolicy):
    """A policy that plans every merge from the start: subclasses give the final groups of original blocks."""

    @property
    def adaptive(self) -> bool:
        return False

    def groups(self, state: SearchState, removals: int) -> list[Span]:
        raise NotImplementedError

    def next_steps(self, state: SearchState) -> list[Step]:
        return steps_towards(state.spans, self.groups(state, state.removed + state.remaining))


class GreedySimilarity(OneShot):
    """The paper's greedy merge: the adjacent groups whose merged span ``a..c`` has the most similar
    first and last block inputs, ``S[a, c]``, with ``S`` measured once on the original model. Ties go to the
    lower blocks. ``keep_last=n``: merge none of the last ``n`` blocks while other pairs are left (default 0,
    the paper's): the input similarity does not see what the last block does to the output."""

    def __init__(self, keep_last: int = 0):
        self.keep_last = check_int("keep_last", keep_last, 0)

    def next_merge(self, similarity: Tensor, groups: list[Span]) -> int:
        """Index ``g``: flatten group ``g`` with group ``g + 1``."""
        if len(groups) < 2:
            raise ValueError("one group left: nothing to merge")
        pairs = range(len(groups) - 1)
        allowed = [g for g in pairs if groups[g + 1][1] < similarity.shape[0] - self.keep_last] or list(pairs)
        return max(allowed, key=lambda g: (float(similarity[groups[g][0], groups[g + 1][1]]), -g))

    def groups(self, state: SearchState, removals: int) -> list[Span]:
        similarity = state.original_similarity()
        groups = [(i, i) for i in range(similarity.shape[0])]
        for _ in range(removals):
            g = self.next_merge(similarity, groups)
            groups[g : g + 2] = [(groups[g][0], groups[g + 1][1])]
        return groups


class GreedyRecompute(GreedySimilarity):
    """The greedy merge with the similarity measured again on the compressed model before every merge
    (between current blocks)."""

    @property
    def adaptive(self) -> bool:
        return True

    def next_steps(self, state: SearchState) -> list[Step]:
        similarity = state.similarity()
        return [Step("merge", self.next_merge(similarity, [(i, i) for i in range(similarity.shape[0])]))]


class FixedSpans(OneShot):
    """Flatten exactly the given spans of original blocks, e.g. ``[(20, 22), (25, 26)]`` (inclusive)."""

    def __init__(self, spans: Sequence[tuple[int, int]]):
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

    def groups(self, state: SearchState, removals: int) -> list[Span]:
        count = state.spans[-1][1] + 1
        if self.spans[-1][1] >= count:
            raise ValueError(f"the fixed spans {self.spans} reach beyond the model's {count} blocks")
        if removals != self.removes:
            raise ValueError(f"the fixed spans {self.spans} remove {self.removes} blocks, not {removals}")
        inside = {i for a, c in self.spans for i in range(a, c + 1)}
        return sorted(self.spans + [(i, i) for i in range(count) if i not in inside])


class LossSearch(PairPolicy):
    """Before every removal, try candidate steps on the model as it is and take the one after which the
    calibration loss on the search sequences is lowest (``SearchState.trial_losses``).

    The candidates: the ``merges`` adjacent pairs whose two blocks have the least summed influence, and the
    ``absorbs`` and ``drops`` blocks of least influence (``None``: every pair or block; 0: none). With every
    drop among the candidates the search can do what SLEB does, so on the search sequences its first step
    is never worse than SLEB's. The search sequences are the first ``search_samples`` of the calibration
    set; the merges and absorbs tried are built on the others, so they are judged on text they were not
    fitted to, and the one chosen is put in as built. ``keep_last=n`` keeps the last ``n`` blocks out of
    every candidate."""

    def __init__(self, search_samples: int = 4, merges: int | None = 4, absorbs: int | None = 4,
                 drops: int | None = 4, keep_last: int = 1):
        check_int("search_samples", search_samples)
        check_int("keep_last", keep_last, 0)
        for name, value in (("merges", merges), ("absorbs", absorbs), ("drops", drops)):
            check_int(name, value, 0, optional=True)
        if merges == absorbs == drops == 0:
            raise ValueError("merges, absorbs and drops cannot all be 0: there would be nothing to try")
        self.search_samples, self.merges, self.absorbs, self.drops = search_samples, merges, absorbs, drops
        self.keep_last = keep_last

    def candidates(self, state: SearchState) -> list[Step]:
        open_blocks = max(len(state.spans) - self.keep_last, 2)
        pairs, blocks = list(range(open_blocks - 1)), list(range(open_blocks))
        wanted = {"merge": (self.merges, pairs), "absorb": (self.absorbs, blocks), "drop": (self.drops, blocks)}
        influence = None
        if any(n is not None and 0 < n < len(among) for n, among in wanted.values()):
            influence = state.influence()
        steps = []
        for kind, (n, among) in wanted.items():
            if n == 0:
                continue
            if n is not None and n < len(among):
                cost = (lambda i: float(influence[i] + influence[i + 1])) if kind == "merge" else \
                    (lambda i: float(influence[i]))
                among = sorted(among, key=lambda i: (cost(i), i))[:n]
            steps += [Step(kind, i) for i in among]
        return sorted(steps, key=lambda s: (s.position, KINDS.index(s.kind)))

    def next_steps(self, state: SearchState) -> list[Step]:
        steps = self.candidates(state)
        losses = state.trial_losses(steps)
        return [min(zip(losses, range(len(steps)), steps))[2]]


class ContiguousCut(PairPolicy):
    """Remove one contiguous run of blocks: the run of ``k`` blocks after block 0 whose input and output are
    closest in angular distance (the choice of Gromov et al. and ReplaceMe: at the last token of each
    calibration sequence; ``tokens="all"`` over all tokens), each of its blocks absorbed in turn into the
    block before the run (``Step("absorb")``: that block's ``down_proj`` refitted to compute what the blocks computed; with
    ``Flattener(fit_to="dense")``, what the original model computed at the end of the run so far). With
    ``merges=True`` each step also tries flattening the two blocks instead (the scorer chooses the heads and
    channels kept) and takes whichever gives the lower loss on the first ``search_samples`` calibration
    sequences (``SearchState.trial_losses``). ``step="merge"``: each block of the run is merged (flattened and
    pruned back) with the block before it instead, which with ``Flattener(select="objective")`` keeps whichever
    of the merge's candidates, the absorb among them, misses the run's output least. ``step="flatten"``: the
    run and the block before it are flattened into one wide block and pruned back once (one ``Step("merge")``
    of ``k + 1`` blocks; with ``select="objective"`` the absorb of the whole run is again a candidate)."""

    STEPS = ("absorb", "merge", "flatten")

    def __init__(self, tokens: str = "last", merges: bool = False, search_samples: int = 4, step: str = "absorb"):
        check_choice("tokens", tokens, TOKENS)
        if not isinstance(merges, (bool, int)):
            raise ValueError(f"merges must be True or False, got {merges!r}")
        if step not in self.STEPS:
            raise ValueError(f"step must be one of {', '.join(map(repr, self.STEPS))}, got {step!r}")
        if merges and step != "absorb":
            raise ValueError(f"merges=True tries a merge beside each absorb; with step={step!r} every step merges already")
        check_int("search_samples", search_samples)
        self.tokens, self.merges, self.search_samples, self.step = tokens, bool(merges), search_samples, step

    @property
    def adaptive(self) -> bool:
        return self.merges

    def start(self, state: SearchState) -> int:
        """The first block of the run (in the original numbering): after the first step, the block that grew."""
        grown = [p for p, (a, c) in enumerate(state.spans) if c > a]
        if len(grown) > 1:
            raise ValueError(f"the blocks hold spans {state.spans}: more than one run was removed")
        if grown:
            return grown[0] + 1
        k = state.remaining
        if k > len(state.spans) - 2:
            raise ValueError(f"a cut after block 0 removes at most {len(state.spans) - 2} of {len(state.spans)} blocks")
        distances = state.cut_distances(k, self.tokens)
        return 1 + int(distances[1:].argmin())

    def groups(self, state: SearchState, removals: int) -> list[Span]:
        s = self.start(state)
        count = state.spans[-1][1] + 1
        return [(i, i) for i in range(s - 1)] + [(s - 1, s - 1 + removals)] + \
            [(i, i) for i in range(s + removals, count)]

    def next_steps(self, state: SearchState) -> list[Step]:
        s = self.start(state)
        if self.step == "flatten":
            return [Step("merge", s - 1, count=state.remaining + 1)]
        if self.step == "merge":
            return [Step("merge", s - 1)] * state.remaining
        if not self.merges:
            return [Step("absorb", s)] * state.remaining
        steps = [Step("absorb", s), Step("merge", s - 1)]
        losses = state.trial_losses(steps)
        return [steps[int(losses[1] < losses[0])]]


POLICIES: Registry[Callable[..., PairPolicy]] = Registry("pair-selection policy")


def register_policy(name: str, factory: Callable[..., PairPolicy] | None = None, *, replace: bool = False):
    """Register a policy class or factory under ``name``; usable as a class decorator."""
    return POLICIES.register_factory(name, factory, replace=replace)


register_policy("greedy", GreedySimilarity)
register_policy("greedy-recompute", GreedyRecompute)
register_policy("fixed", FixedSpans)
register_policy("loss-search", LossSearch)
register_policy("cut", ContiguousCut)
register_policy("cut-merge", functools.partial(ContiguousCut, step="merge"))
register_policy("cut-flatten", functools.partial(ContiguousCut, step="flatten"))
register_policy("trial-loss", lambda search_samples=4, shortlist=None, keep_last=0:
                LossSearch(search_samples, merges=shortlist, absorbs=0, drops=0, keep_last=keep_last))


def get_policy(policy: str | PairPolicy, **options) -> PairPolicy:
    """A policy instance from a registered name (with options) or an instance (returned as is)."""
    return POLICIES.build(policy, PairPolicy, **options)
