"""Executing a plan: the block each step puts in place of its blocks, built on the activations that reach it.

A policy proposes steps (``Step``: merge, absorb or drop); the ``Executor`` takes them on the model, in place.
For a merge or an absorb it builds the new block with the recipe the ``MergeOptions`` name
(``flatten.recipe``), on the calibration activations at the step's input in the already-compressed model
(sequential calibration, kept between steps by ``Activations``) and, with ``fit_to="dense"``, fitted to the
original model's activations after the blocks it replaces; with the one-block fallback, it then keeps the
best of the merge and the two selections that keep one block whole. A resumed plan's steps are replayed,
not rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from flatten.criteria.policies import Span, Step, pair_of
from flatten.criteria.scorers import ChannelScorer
from flatten.engine.activations import Activations
from flatten.engine.fallback import one_block_fallback
from flatten.evaluation.measure import Stopwatch
from flatten.pair import BlockPair, BlockRun
from flatten.plan import Merge
from flatten.recipe import RECIPES, input_rms_weights, pair_outputs, side
from flatten.strategies.compressor import Compressor
from flatten.strategies.signals import loss_from


@dataclass(frozen=True)
class MergeOptions:
    """How a step's block is built: the ``Flattener`` options of the same names."""

    scorer: ChannelScorer
    prune: bool | str = True
    select: str = "scorer"
    token_weighting: str = "none"
    fit_to: str = "dense"
    one_block_fallback: bool | str = False


class Executor:
    """Takes steps on ``compressor``'s model. ``activations`` (None: the activations are given to ``build``
    by the caller) keeps the block inputs between steps; ``watch`` is charged with the time of each phase;
    ``choices`` collects the one-block fallback's choice at every merge."""

    def __init__(self, compressor: Compressor, options: MergeOptions, watch: Stopwatch,
                 activations: Activations | None = None):
        self.compressor, self.options, self.watch, self.activations = compressor, options, watch, activations
        self.model, self.arch, self.device = compressor.model, compressor.arch, compressor.device
        self.choices: list[dict] = []

    def take(self, step: Step, spans: list[Span], similarity: list[list[float]] | None,
             built: dict[Step, tuple]) -> Merge:
        """Take ``step`` on the model of current ``spans``; return its record. A block a trial already built
        (in ``built``) is put in as it is."""
        p, keep = pair_of(step, len(spans))
        span = (spans[p][0], spans[p + step.count - 1][1])
        similarity = None if similarity is None else float(similarity[span[0]][span[1]])
        if step.kind == "drop":  # a merge that keeps one block of the pair whole, uncompensated
            want = self.arch.shape_of(self.model.config)
            merge = Merge(p, span, similarity, side(keep, want.num_kv_heads).tolist(),
                          side(keep, want.intermediate_size).tolist())
            with self.watch("flatten and prune"):
                merge.apply(self.model)
            return merge
        if step in built:
            block, merge, choice = built[step]
        else:
            block, merge, choice = self.build([(p, keep, step.count)], self.all_rows(), spans)[0]
        merge.similarity = similarity
        if choice is not None:
            self.choices.append(choice)
        BlockRun(self.model, p, step.count).replace(block)
        return merge

    def replay(self, merge: Merge) -> None:
        """Put a recorded step (from a resumed plan) back on the model."""
        with self.watch("replaying the checkpoint"):
            merge.apply(self.model)

    def merged(self, merge: Merge) -> None:
        """Keep the activations in step with a step taken."""
        self.activations.merged(merge.position, merge.count)

    def all_rows(self) -> slice:
        return slice(0, self.compressor.calibration.shape[0])

    def build(self, requests: list[tuple[int, str | None, int]], rows: slice, spans: list[Span]) -> list[tuple]:
        """``build_block`` for each ``(position, keep, count)`` (positions ascending) of the model as it is, on
        the calibration ``rows``, walking the activations up from the highest cursor below each."""
        built = []
        for p, keep, count in requests:
            cursor = self.activations.at(p, rows, spans)
            span = (spans[p][0], spans[p + count - 1][1])
            targets = None
            if self.options.fit_to == "dense":  # the original model's activations after the run's original blocks
                with self.watch("original model's activations"):
                    targets = self.activations.dense_after(cursor, *span)
            built.append(self.build_block(p, span, cursor.hidden, cursor.calls[p], targets, keep, count))
        return built

    def build_block(self, position: int, span: Span, hidden: list[Tensor], calls: list,
                    fit_targets: list[Tensor] | None = None, keep: str | None = None,
                    count: int = 2) -> tuple[nn.Module, Merge, dict | None]:
        """The block that would replace blocks ``position`` .. ``position + count - 1`` (``merge_pair``, or the
        ablation ``prune`` names), its Merge record, and the one-block-fallback choice (None without it); the
        model is not changed. The refit fits ``fit_targets`` if given, else the original blocks' output."""
        options = self.options
        if count != 2 and options.one_block_fallback:
            raise ValueError(f"the one-block fallback compares the merges of two blocks: a merge of {count} blocks "
                             f"at once does not take one_block_fallback={options.one_block_fallback!r}")
        pair = BlockRun(self.model, position, count) if count != 2 else BlockPair(self.model, position)
        if options.prune is not True:
            want = self.arch.shape_of(self.model.config)
            if any(self.arch.block_shape(b, self.model.config) != want for b in pair.blocks):
                raise ValueError(f"prune={options.prune!r} leaves wide blocks: a later step cannot flatten them "
                                 f"again (span {span} takes in a wide block); flatten the span at once")
        weights = input_rms_weights(hidden) if options.token_weighting == "input-rms" else None
        first = pair_targets = None
        if options.one_block_fallback == "reconstruction":
            with self.watch("targets: the two original blocks"):
                first, pair_targets = pair_outputs(pair, hidden, calls, self.device)
        block, merge = RECIPES[options.prune](pair, options.scorer, hidden, calls, token_weights=weights, keep=keep,
                                              select=options.select,
                                              targets=fit_targets if fit_targets is not None else pair_targets,
                                              device=self.device, watch=self.watch)
        merge.span, merge.similarity = span, None
        if not options.one_block_fallback:
            return block, merge, None
        judge = options.one_block_fallback
        if judge == "loss":  # the model's loss on the first batch with a candidate in place of the pair
            batches = self.compressor.batches[:1]

            def judge(candidate: nn.Module) -> float:
                return loss_from(self.compressor, hidden[:1], position + 2, batches, then=[candidate])
        with self.watch("one-block fallback"):
            return one_block_fallback(pair, block, merge, judge, hidden, calls, first, pair_targets, weights,
                                      self.device)
