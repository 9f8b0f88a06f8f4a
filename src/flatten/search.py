"""The compression in progress, as a policy sees it: spans, progress, and signals computed on demand.

``Search`` is the ``SearchState`` a ``Flattener`` hands to its pair-selection policy. Every signal is
computed only when a policy asks for it, on the model as it is at that moment; the block-input similarity
of the original model is computed once and kept in the plan (a resumed run reads it from there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flatten.calibration import block_influence
from flatten.criteria.policies import Span, Step, pair_of


class Search:
    """The ``SearchState`` of one ``Flattener.compress`` call."""

    def __init__(self, flattener, plan, remove: int):
        self.flattener, self.plan = flattener, plan
        self.spans: list[Span] = [(i, i) for i in range(len(flattener.arch.layers_of(flattener.model)))]
        self.removed, self.remaining = 0, remove
        self.search_samples = getattr(flattener.policy, "search_samples", None)
        self.built: dict[Step, tuple] = {}  # merges built for trials and still valid: the chosen one is taken as is

    def taken(self, p: int) -> None:
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
            with self.flattener.watch("block inputs and similarity"):
                self.plan.similarity = self.flattener.similarity_matrix().tolist()
            self.flattener.save_progress(self.plan)
        return torch.tensor(self.plan.similarity, dtype=torch.float64)

    def similarity(self) -> Tensor:
        with self.flattener.watch("block inputs and similarity"):
            similarity = self.flattener.similarity_matrix()
        if self.plan.similarity is None and not self.removed:
            self.plan.similarity = similarity.tolist()
        return similarity

    @torch.no_grad()
    def influence(self) -> Tensor:
        f = self.flattener
        influence = torch.zeros(len(self.spans), dtype=torch.float64)
        with f.watch("block influence"):
            for i, hidden, calls in f.block_inputs(self.search_batches()):
                influence[i] = block_influence(hidden, f.run_layer(f.arch.layers_of(f.model)[i], hidden, calls,
                                                              name=f"block {i}"))
        return influence

    def cut_distances(self, k: int, tokens: str = "all") -> Tensor:
        with self.flattener.watch("block inputs and similarity"):
            distances = self.flattener.cut_distances(k, tokens)
        self.plan.method.setdefault("cut_distances", distances.tolist())
        return distances

    def trial_losses(self, steps: list[Step]) -> list[float]:
        f = self.flattener
        count = len(self.spans)
        pairs = {step: pair_of(step, count) for step in steps}
        missing = sorted((s for s in steps if s.kind != "drop" and s not in self.built), key=lambda s: pairs[s][0])
        self.built.update(zip(missing, f.build_at([(*pairs[s], s.count) for s in missing], self.fit_rows(), self.spans)))
        losses = {}
        search = self.search_batches()
        last = max(pairs[s][0] if s.kind != "drop" else s.position for s in steps)
        with f.watch("trial losses"):
            for i, hidden, _ in f.block_inputs(search):
                for step in steps:
                    if step.kind == "drop" and step.position == i:  # block i's input goes straight to block i + 1
                        losses[step] = f.loss_from(hidden, i + 1, search)
                    elif step.kind != "drop" and pairs[step][0] == i:
                        losses[step] = f.loss_from(hidden, i + step.count, search, then=[self.built[step][0]])
                if i >= last:
                    break
        self.plan.method.setdefault("search", []).append(
            {"removed": self.removed, "tried": {str(s): losses[s] for s in steps}})
        return [losses[s] for s in steps]

    # --- the calibration rows a search uses ------------------------------------------------------------

    def search_batches(self) -> list[Tensor]:
        rows = self.search_samples or self.flattener.calibration.shape[0]
        return list(self.flattener.calibration[:rows].split(self.flattener.batch_size))

    def fit_rows(self) -> slice:
        """The calibration rows that trial merges are built on: those the search does not score."""
        n = self.flattener.calibration.shape[0]
        if self.search_samples is None or self.search_samples >= n:
            return slice(0, n)
        return slice(self.search_samples, n)
