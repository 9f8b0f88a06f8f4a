"""One merge as a recipe any code can call: flatten a pair, let a scorer choose and compensate, prune back
(docs/method.md sections 2-4). The ``Flattener`` schedules merges; this is what each one does. The ablations
at the end take the same steps and stop early."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from flatten.calibration import attention_stats, mlp_stats, on_device, run_block, token_rows
from flatten.criteria.scorers import ChannelScorer, Choice
from flatten.dispatch import device_of
from flatten.merge import select_block
from flatten.pair import BlockPair
from flatten.plan import Merge


def side(keep: str, count: int) -> Tensor:
    """The indices of the first or the second block's ``count`` groups or channels in a wide block."""
    offset = {"first": 0, "second": 1}[keep]
    return torch.arange(offset * count, (offset + 1) * count)


def input_rms_weights(hidden: list[Tensor]) -> list[Tensor]:
    """Per token, one over the mean square of the block input (``token_weighting="input-rms"``)."""
    return [1 / token_rows(x).float().square().mean(-1).clamp_min(torch.finfo(torch.float32).tiny) for x in hidden]


def pair_outputs(pair: BlockPair, hidden: list[Tensor], calls: list, device) -> tuple[list[Tensor], list[Tensor]]:
    """The first block's output and the two blocks' output, one after the other, on ``hidden`` (computed on
    ``device``)."""
    with on_device(pair.first, device):
        first = run_block(pair.first, hidden, calls, "first block")
    with on_device(pair.second, device):
        return first, run_block(pair.second, first, calls, "second block")


def choose_channels(block: nn.Module, arch, config, scorer: ChannelScorer, hidden: list[Tensor], calls: list,
                    targets: list[Tensor] | None, width: int, forced: Tensor | None = None,
                    token_weights: list[Tensor] | None = None, watch=None) -> Choice:
    """The ``width`` MLP channels of ``block`` the scorer keeps (or the ``forced`` ones) and its ``down_proj``
    refit, from the channel activations on ``hidden``; a scorer that fits a target fits ``targets``."""
    watch = watch or (lambda phase: nullcontext())
    with watch("MLP statistics"):
        stats = mlp_stats(block, arch, arch.block_shape(block, config), hidden, calls,
                          targets if scorer.needs_target else None, token_weights)
    with watch("selection and refits"):
        if forced is None:
            return scorer.select_channels(stats, width)
        return Choice(forced, scorer.compensate_channels(stats, forced))


class _Recipe:
    """The shared arguments of the steps of one merge."""

    def __init__(self, pair: BlockPair, scorer: ChannelScorer, hidden: list[Tensor], calls: list,
                 token_weights: list[Tensor] | None, device, watch):
        self.pair, self.scorer, self.hidden, self.calls, self.weights = pair, scorer, hidden, calls, token_weights
        self.arch, self.config = pair.arch, pair.model.config
        self.want = self.arch.shape_of(self.config)
        self.home = device_of(pair.first)
        self.device = device or self.home
        self.watch = watch or (lambda phase: nullcontext())

    def wide(self) -> nn.Module:
        with self.watch("flatten and prune"):
            return self.pair.flatten().to(self.device)

    def groups(self, wide: nn.Module, keep: str | None) -> Choice:
        """The KV groups kept: one block's (``keep``), or the scorer's choice with its ``o_proj`` refit."""
        if keep is not None:
            return Choice(side(keep, self.want.num_kv_heads))
        shape = self.arch.block_shape(wide, self.config)
        with self.watch("attention statistics"):
            stats = attention_stats(wide, self.arch, shape, self.hidden, self.calls, self.weights)
        with self.watch("selection and refits"):
            return self.scorer.select_groups(stats, self.want.num_kv_heads)

    def half(self, wide: nn.Module, groups: Choice) -> nn.Module:
        """The wide block with only the kept groups (its MLP still wide)."""
        shape = self.arch.block_shape(wide, self.config)
        with self.watch("flatten and prune"):
            return select_block(wide, self.arch, self.config, self.pair.index, groups.keep,
                                range(shape.intermediate_size), o_proj=groups.weight)

    def channels(self, half: nn.Module, targets: list[Tensor] | None, keep: str | None) -> Choice:
        """The MLP channels kept (the scorer's choice, or one block's) and the ``down_proj`` refit. Without
        ``targets``, a scorer that fits a target fits what the two blocks compute one after the other."""
        if self.scorer.needs_target and targets is None:
            with self.watch("targets: the two original blocks"):
                targets = pair_outputs(self.pair, self.hidden, self.calls, self.device)[1]
        forced = None if keep is None else side(keep, self.want.intermediate_size)
        return choose_channels(half, self.arch, self.config, self.scorer, self.hidden, self.calls, targets,
                               self.want.intermediate_size, forced, self.weights, self.watch)

    def record(self, groups: Choice, channels: Choice) -> Merge:
        p = self.pair.index
        return Merge(p, (p, p + 1), None, groups.keep.tolist(), channels.keep.tolist(),
                     None if groups.weight is None else groups.weight.to(self.home),
                     None if channels.weight is None else channels.weight.to(self.home))


def merge_pair(pair: BlockPair, scorer: ChannelScorer, hidden: list[Tensor], calls: list, *,
               targets: list[Tensor] | None = None, keep: str | None = None,
               token_weights: list[Tensor] | None = None, device=None, watch=None) -> tuple[nn.Module, Merge]:
    """The block that would replace ``pair`` and its ``Merge`` record; the model is not changed.

    ``hidden`` and ``calls``: the pair's input on the calibration batches and the other arguments of its
    layers. The scorer chooses the KV groups kept and refits ``o_proj``, then, on the activations of the
    attention so pruned, the MLP channels kept and the ``down_proj`` refit to ``targets`` (default: what the
    two blocks compute one after the other). ``keep="first"`` or ``"second"`` keeps that block's groups and
    channels: its attention as it was, its ``down_proj`` refitted (it absorbs the other block).
    ``token_weights``: per token, how much its error counts. ``device``: where the work is done. ``watch``: a
    ``Stopwatch`` the phases are timed in. The record's span is that of a pair of single blocks."""
    recipe = _Recipe(pair, scorer, hidden, calls, token_weights, device, watch)
    wide = recipe.wide()
    groups = recipe.groups(wide, keep)
    half = recipe.half(wide, groups)
    channels = recipe.channels(half, targets, keep)
    del half
    merge = recipe.record(groups, channels)
    with recipe.watch("flatten and prune"):
        block = pair.prune(wide, merge.keep_groups, merge.keep_channels, merge.o_proj, merge.down_proj)
    return block.to(recipe.home), merge


def flatten_only(pair: BlockPair, *_, **__) -> tuple[nn.Module, Merge]:
    """The ablation "flatten, do not prune": the wide block (no parameters saved; not a stock checkpoint)."""
    wide = pair.flatten()
    shape = pair.arch.block_shape(wide, pair.model.config)
    p = pair.index
    return wide, Merge(p, (p, p + 1), None, list(range(shape.num_kv_heads)), list(range(shape.intermediate_size)))


def prune_attention_only(pair: BlockPair, scorer: ChannelScorer, hidden: list[Tensor], calls: list, *,
                         token_weights=None, device=None, watch=None, **_) -> tuple[nn.Module, Merge]:
    """The ablation "prune the attention only": every MLP channel of both blocks stays."""
    recipe = _Recipe(pair, scorer, hidden, calls, token_weights, device, watch)
    wide = recipe.wide()
    groups = recipe.groups(wide, None)
    half = recipe.half(wide, groups)
    channels = list(range(recipe.arch.block_shape(wide, recipe.config).intermediate_size))
    return half.to(recipe.home), Merge(pair.index, (pair.index, pair.index + 1), None, groups.keep.tolist(), channels)


def prune_mlp_only(pair: BlockPair, scorer: ChannelScorer, hidden: list[Tensor], calls: list, *,
                   targets=None, token_weights=None, device=None, watch=None, **_) -> tuple[nn.Module, Merge]:
    """The ablation "prune the MLP only": every head of both blocks stays."""
    recipe = _Recipe(pair, scorer, hidden, calls, token_weights, device, watch)
    wide = recipe.wide()
    groups = Choice(torch.arange(recipe.arch.block_shape(wide, recipe.config).num_kv_heads))
    half = recipe.half(wide, groups)
    channels = recipe.channels(half, targets, None)
    with recipe.watch("flatten and prune"):
        block = select_block(wide, recipe.arch, recipe.config, pair.index, groups.keep, channels.keep,
                             down_proj=channels.weight)
    return block.to(recipe.home), recipe.record(groups, channels)


RECIPES = {True: merge_pair, False: flatten_only, "attention": prune_attention_only, "mlp": prune_mlp_only}
