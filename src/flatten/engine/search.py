"""The compression in progress, as a policy sees it: spans, progress, and signals computed on demand.

``Search`` is the ``SearchState`` a ``Flattener`` hands to its pair-selection policy, and the policy's
steps go back to the ``Executor`` through it. Every signal is
computed only when a policy asks for it, on the model as it is at that moment; the block-input similarity
of the original model is computed once and kept in the plan (a resumed run reads it from there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flatten.calibration import block_influence
from flatten.criteria.policies import Span, Step, pair_of
from flatten.engine.executor import Executor
from flatten.plan import Merge, Plan
from flatten.strategies.compressor import Compressor
from flatten.strategies.signals import cut_distances, loss_from


class Search:
    """The ``SearchState`` of one compression: ``compressor``'s model as ``executor`` changes it, toward
    removing ``remove`` blocks. ``similarity`` measures the block-input similarity of the model as it is;
    ``search_samples`` (None: all) are the calibration rows a search scores on; ``save`` is called with the
    plan whenever a signal kept in it is new."""

    def __init__(self, compressor: Compressor, executor: Executor, plan: Plan, remove: int,
                 similarity: Callable[[], Tensor], search_samples: int | None = None,
                 save: Callable[[Plan], None] = lambda plan: None):
        self.compressor, self.executor, self.plan = compressor, executor, plan
        self.measure_similarity, self.search_samples, self.save = similarity, search_samples, save
        self.watch = executor.watch
        self.spans: list[Span] = [(i, i) for i in range(len(compressor.arch.layers_of(compressor.model)))]
        self.removed, self.remaining = 0, remove
        self.built: dict[Step, tuple] = {}  # merges built for trials and still valid: the chosen one is taken as is

    def take(self, step: Step) -> Merge:
        """Take ``step`` on the model and account for it."""
        merge = self.executor.take(step, self.spans, self.plan.similarity, self.built)
        self.taken(merge)
        return merge

    def taken(self, merge: Merge) -> None:
        """Account for ``merge`` (taken, or replayed from a checkpoint): its blocks became one."""
        for _ in range(merge.count - 1):
            self.joined(merge.position)
        self.executor.merged(merge)

    def joined(self, p: int) -> None:
        """Account for blocks ``p`` and ``p + 1`` having become one block (merged, or one of them dropped).
        Merges built at a pair below ``p`` stay valid: neither their blocks nor their input changed."""
        self.spans[p : p + 2] = [(self.spans[p][0], self.spans[p + 1][1])]
        self.removed, self.remaining = self.removed + 1, self.remaining - 1
        count = len(self.spans) + 1
        self.built = {step: built for step, built in self.built.items() if pair_of(step, count)[0] + step.count - 1 < p}

    # --- signals -----------------------------------------------------------------------------------------

    def original_similarity(self) -> Tensor:
        if self.plan.similarity is None:
            if self.removed:
                raise RuntimeError("the original model's similarity is asked for after the model has changed")
            with self.watch("block inputs and similarity"):
                self.plan.similarity = self.measure_similarity().tolist()
            self.save(self.plan)
        return torch.tensor(self.plan.similarity, dtype=torch.float64)

    def similarity(self) -> Tensor:
        with self.watch("block inputs and similarity"):
            similarity = self.measure_similarity()
        if self.plan.similarity is None and not self.removed:
            self.plan.similarity = similarity.tolist()
        return similarity

    @torch.no_grad()
    def influence(self) -> Tensor:
        f = self.compressor
        influence = torch.zeros(len(self.spans), dtype=torch.float64)
        with self.watch("block influence"):
            for i, hidden, calls in f.block_inputs(self.search_batches()):
                influence[i] = block_influence(hidden, f.run_layer(f.arch.layers_of(f.model)[i], hidden, calls,
                                                              name=f"block {i}"))
        return influence

    def cut_distances(self, k: int, tokens: str = "all") -> Tensor:
        with self.watch("block inputs and similarity"):
            distances = cut_distances(self.compressor, k, tokens)
        self.plan.method.setdefault("cut_distances", distances.tolist())
        return distances

    def trial_losses(self, steps: list[Step]) -> list[float]:
        f = self.compressor
        count = len(self.spans)
        pairs = {step: pair_of(step, count) for step in steps}
        missing = sorted((s for s in steps if s.kind != "drop" and s not in self.built), key=lambda s: pairs[s][0])
        self.built.update(zip(missing, self.executor.build([(*pairs[s], s.count) for s in missing], self.fit_rows(),
                                                           self.spans)))
        losses = {}
        search = self.search_batches()
        last = max(pairs[s][0] if s.kind != "drop" else s.position for s in steps)
        with self.watch("trial losses"):
            for i, hidden, _ in f.block_inputs(search):
                for step in steps:
                    if step.kind == "drop" and step.position == i:  # block i's input goes straight to block i + 1
                        losses[step] = loss_from(f, hidden, i + 1, search)
                    elif step.kind != "drop" and pairs[step][0] == i:
                        losses[step] = loss_from(f, hidden, i + step.count, search, then=[self.built[step][0]])
                if i >= last:
                    break
        self.plan.method.setdefault("search", []).append(
            {"removed": self.removed, "tried": {str(s): losses[s] for s in steps}})
        return [losses[s] for s in steps]

    # --- the calibration rows a search uses ------------------------------------------------------------

    def search_batches(self) -> list[Tensor]:
        rows = self.search_samples or self.compressor.calibration.shape[0]
        return list(self.compressor.calibration[:rows].split(self.compressor.batch_size))

    def fit_rows(self) -> slice:
        """The calibration rows that trial merges are built on: those the search does not score."""
        n = self.compressor.calibration.shape[0]
        if self.search_samples is None or self.search_samples >= n:
            return slice(0, n)
        return slice(self.search_samples, n)
