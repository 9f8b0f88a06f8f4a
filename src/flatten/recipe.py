"""One merge as a recipe any code can call: flatten a pair (or a longer run of blocks), let a scorer choose and
compensate, prune back (docs/method.md sections 2-4). The ``Flattener`` schedules merges; this is what each one
does. The ablations at the end take the same steps and stop early."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatten.calibration import attention_stats, mlp_stats, on_device, refit_error, run_block, token_rows
from flatten.criteria.scorers import ChannelScorer, Choice, refit_residual, top
from flatten.merge import select_block
from flatten.models.dispatch import device_of
from flatten.pair import BlockPair, BlockRun
from flatten.plan import Merge


def block_index(keep: str | int) -> int:
    """The index in a run of the block ``keep`` names: ``"first"`` (0), ``"second"`` (1), or an index."""
    return {"first": 0, "second": 1}.get(keep, keep)


def side(keep: str | int, count: int) -> Tensor:
    """The indices of block ``keep``'s ``count`` groups or channels in a wide block (``block_index``)."""
    offset = block_index(keep)
    return torch.arange(offset * count, (offset + 1) * count)


def input_rms_weights(hidden: list[Tensor]) -> list[Tensor]:
    """Per token, one over the mean square of the block input (``token_weighting="input-rms"``)."""
    return [1 / token_rows(x).float().square().mean(-1).clamp_min(torch.finfo(torch.float32).tiny) for x in hidden]


def run_output(run: BlockRun, hidden: list[Tensor], calls: list, device) -> list[Tensor]:
    """What the run's blocks compute one after the other on ``hidden`` (computed on ``device``)."""
    for i, block in enumerate(run.blocks):
        with on_device(block, device):
            hidden = run_block(block, hidden, calls, f"block {i + 1} of the run")
    return hidden


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

    def __init__(self, run: BlockRun, scorer: ChannelScorer, hidden: list[Tensor], calls: list,
                 token_weights: list[Tensor] | None, device, watch):
        self.run, self.scorer, self.hidden, self.calls, self.weights = run, scorer, hidden, calls, token_weights
        self.arch, self.config = run.arch, run.model.config
        self.want = self.arch.shape_of(self.config)
        self.home = device_of(run.first)
        self.device = device or self.home
        self.watch = watch or (lambda phase: nullcontext())

    def wide(self) -> nn.Module:
        with self.watch("flatten and prune"):
            return self.run.flatten().to(self.device)

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
            return select_block(wide, self.arch, self.config, self.run.index, groups.keep,
                                range(shape.intermediate_size), o_proj=groups.weight)

    def channels(self, half: nn.Module, targets: list[Tensor] | None, keep: str | None) -> Choice:
        """The MLP channels kept (the scorer's choice, or one block's) and the ``down_proj`` refit. Without
        ``targets``, a scorer that fits a target fits what the blocks compute one after the other."""
        if self.scorer.needs_target and targets is None:
            targets = self.targets()
        forced = None if keep is None else side(keep, self.want.intermediate_size)
        return choose_channels(half, self.arch, self.config, self.scorer, self.hidden, self.calls, targets,
                               self.want.intermediate_size, forced, self.weights, self.watch)

    def targets(self) -> list[Tensor]:
        with self.watch("targets: the original blocks"):
            return run_output(self.run, self.hidden, self.calls, self.device)

    def record(self, groups: Choice, channels: Choice) -> Merge:
        p, n = self.run.index, self.run.count
        return Merge(p, (p, p + n - 1), None, groups.keep.tolist(), channels.keep.tolist(),
                     None if groups.weight is None else groups.weight.to(self.home),
                     None if channels.weight is None else channels.weight.to(self.home), count=n)


SELECTIONS = ("scorer", "objective", "held-out")


def merge_pair(pair: BlockRun, scorer: ChannelScorer, hidden: list[Tensor], calls: list, *,
               targets: list[Tensor] | None = None, keep: str | int | None = None, select: str = "scorer",
               token_weights: list[Tensor] | None = None, device=None, watch=None) -> tuple[nn.Module, Merge]:
    """The block that would replace ``pair`` (a ``BlockPair``, or a ``BlockRun`` of more blocks, flattened
    into one wide block and pruned back once) and its ``Merge`` record; the model is not changed.

    ``hidden`` and ``calls``: the pair's input on the calibration batches and the other arguments of its
    layers. With ``select="scorer"`` (the paper) the scorer chooses the KV groups kept and refits ``o_proj``,
    then, on the activations of the attention so pruned, the MLP channels kept and the ``down_proj`` refit to
    ``targets`` (default: what the blocks compute one after the other). With ``select="objective"`` the
    scorer's rankings propose candidates, among them each block kept whole, and the one whose block misses
    ``targets`` least on the calibration tokens is kept (``merge_by_objective``). ``keep="first"``,
    ``"second"`` or a block's index keeps that block's groups and channels: its attention as it was, its
    ``down_proj`` refitted (it absorbs the others). ``token_weights``: per token, how much its error counts.
    ``device``: where the work is done. ``watch``: a ``Stopwatch`` the phases are timed in. The record's span
    is that of a run of single blocks."""
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {', '.join(SELECTIONS)}, got {select!r}")
    recipe = _Recipe(pair, scorer, hidden, calls, token_weights, device, watch)
    wide = recipe.wide()
    if select in ("objective", "held-out") and keep is None:
        return merge_by_objective(recipe, wide, targets, held_out=select == "held-out")
    approximate = keep is not None and recipe.arch.refit_approximation is not None  # a refit through a norm
    if approximate and targets is None:
        targets = recipe.targets()  # what the refit's error is measured against
    groups = recipe.groups(wide, keep)
    half = recipe.half(wide, groups)
    channels = recipe.channels(half, targets, keep)
    del half
    merge = recipe.record(groups, channels)
    with recipe.watch("flatten and prune"):
        block = pair.prune(wide, merge.keep_groups, merge.keep_channels, merge.o_proj, merge.down_proj)
    if approximate and merge.down_proj is not None:  # never silent: the refit's error, measured, in the record
        with recipe.watch("refit error"):
            kept = pair.blocks[block_index(keep)]
            merge.selection = {"refit": refit_error(block, kept, recipe.arch, hidden, calls, targets)}
    return block.to(recipe.home), merge


def _first_and_rest(scores: Tensor, count: int, from_rest: int) -> Tensor:
    """The ``count - from_rest`` best-scored of the first block's groups or channels in a wide block and the
    ``from_rest`` best of the other blocks', as sorted indices of the wide block."""
    first = top(scores[:count], count - from_rest) if from_rest < count else torch.zeros(0, dtype=torch.long)
    rest = top(scores[count:], from_rest) + count if from_rest else torch.zeros(0, dtype=torch.long)
    return torch.cat([first, rest])


def _candidates(scores: Tensor, count: int, mixes: list[int]) -> dict[str, Tensor]:
    """Named selections of ``count`` of the ``n count`` groups or channels of a wide block of ``n`` blocks:
    each block whole, the ``count`` best by ``scores`` over all, and ``count - j`` of the first block with
    ``j`` of the others (of the second, in a pair), each the best of its part by ``scores``, for ``j`` in
    ``mixes``. Duplicates are left out."""
    blocks = scores.numel() // count
    found = {f"block {i + 1} whole": side(i, count) for i in range(blocks)}
    found["best of both" if blocks == 2 else "best of all"] = top(scores, count)
    found.update({f"{count - j} + {j}": _first_and_rest(scores, count, j) for j in mixes})
    unique: dict[str, Tensor] = {}
    for name, keep in found.items():
        if not any(torch.equal(keep, other) for other in unique.values()):
            unique[name] = keep
    return unique


def _splits(count: int) -> list[int]:
    """How many of ``count`` kept groups or channels the split candidates take from the other blocks: about a
    quarter, a half and three quarters (each split needs its own statistics or refit: a few, at any width)."""
    quarter = max(1, count // 4)
    return sorted({quarter, count // 2, count - quarter} & set(range(1, count)))


def merge_by_objective(recipe: _Recipe, wide: nn.Module, targets: list[Tensor] | None,
                       held_out: bool = False) -> tuple[nn.Module, Merge]:
    """The pruned block, of candidate selections, whose output misses ``targets`` least on the calibration
    tokens (``refit_residual``; default target: what the blocks compute one after the other).

    The scorer ranks; the objective decides. KV-group candidates: each block's groups as they are (no
    ``o_proj`` refit), the scorer's own choice, and splits of a quarter, half and three quarters of the kept
    groups from the second block (in a run of more: from the blocks after the first), each part's best by the
    scorer's group scores, ``o_proj`` compensated by the scorer. For each, the MLP statistics on the
    attention so pruned, and channel candidates: each block's channels, the best by the scorer's channel
    scores over all blocks and the same splits, each ``down_proj`` compensated by the scorer (and, where a
    scorer overrides ``select_channels``, its own choice). "Block 1 whole" for both is exactly what
    ``keep="first"`` builds (the absorb), so the result never misses the target by more than the absorb does.

    ``held_out``: the candidates are refitted on the even calibration batches and judged on the odd ones
    (what a refit misses on tokens it was not fitted to), and the winner is refitted on all of them."""
    if targets is None:
        targets = recipe.targets()
    batches = _Batches(recipe.hidden, recipe.calls, targets, recipe.weights)
    if not held_out:
        (group_name, group), (channel_name, channels), residuals = _judge(recipe, wide, batches, batches)
    else:
        if len(batches.hidden) < 2:
            raise ValueError("select='held-out' judges on other calibration batches than it fits on: it needs at "
                             f"least two batches, got {len(batches.hidden)} (lower batch_size or add samples)")
        (group_name, group), (channel_name, channels), residuals = _judge(recipe, wide, batches.part(0),
                                                                          batches.part(1))
        group, channels = _refit(recipe, wide, batches, group, channels)
    merge = recipe.record(group, channels)
    merge.selection = {"groups": group_name, "channels": channel_name, "residuals": residuals,
                       **({"judged_on": "held-out batches"} if held_out else {})}
    with recipe.watch("flatten and prune"):
        block = recipe.run.prune(wide, merge.keep_groups, merge.keep_channels, merge.o_proj, merge.down_proj)
    return block.to(recipe.home), merge


@dataclass
class _Batches:
    """Calibration batches at the run's input: hidden states, the layers' other arguments, the targets and
    the tokens' weights (or None)."""

    hidden: list[Tensor]
    calls: list
    targets: list[Tensor]
    weights: list[Tensor] | None

    def part(self, parity: int) -> "_Batches":
        """The even (0) or odd (1) batches."""
        pick = slice(parity, None, 2)
        return _Batches(self.hidden[pick], self.calls[pick], self.targets[pick],
                        None if self.weights is None else self.weights[pick])


def _judge(recipe: _Recipe, wide: nn.Module, fit: _Batches, judge: _Batches):
    """Refit every candidate on ``fit`` and measure what it misses on ``judge`` (where they are the same
    batches, their statistics are shared). Returns ``(group name, Choice)`` and ``(channel name, Choice)`` of
    the candidate that misses least, and every candidate's residual by name."""
    g, f = recipe.want.num_kv_heads, recipe.want.intermediate_size
    shape = recipe.arch.block_shape(wide, recipe.config)
    with recipe.watch("attention statistics"):
        attention = attention_stats(wide, recipe.arch, shape, fit.hidden, fit.calls, fit.weights)
    with recipe.watch("selection and refits"):
        own = recipe.scorer.select_groups(attention, g)
        ranks = recipe.scorer.score_groups(attention).double().cpu()  # indices stay on the CPU, as side()'s
        groups = {name: Choice(keep, None if name.startswith("block") else recipe.scorer.compensate_groups(attention, keep))
                  for name, keep in _candidates(ranks, g, _splits(g)).items()}
        same = [name for name, c in groups.items()
                if torch.equal(own.keep.cpu(), c.keep) and (own.weight is None) == (c.weight is None)]
        first = same[0] if same else "scorer's choice"
        groups = {first: groups.get(first, own), **{name: c for name, c in groups.items() if name != first}}
    channel_scores, best, residuals = None, None, {}
    for group_name, group in groups.items():
        half = recipe.half(wide, group)
        with recipe.watch("MLP statistics"):
            shape = recipe.arch.block_shape(half, recipe.config)
            stats = mlp_stats(half, recipe.arch, shape, fit.hidden, fit.calls, fit.targets, fit.weights)
            judged = stats if judge is fit else \
                mlp_stats(half, recipe.arch, shape, judge.hidden, judge.calls, judge.targets, judge.weights)
        del half
        with recipe.watch("selection and refits"):
            choices = {}
            if channel_scores is None:  # ranked once, with the scorer's own choice of groups
                channel_scores = recipe.scorer.score_channels(stats).double().cpu()
                if type(recipe.scorer).select_channels is not ChannelScorer.select_channels:  # its own choice too
                    choices["scorer's choice"] = recipe.scorer.select_channels(stats, f)
            for channel_name, keep in _candidates(channel_scores, f, _splits(f)).items():
                choices[channel_name] = Choice(keep, recipe.scorer.compensate_channels(stats, keep))
            for channel_name, choice in choices.items():
                residual = refit_residual(judged, choice.keep.cpu(), choice.weight)
                residuals[f"{group_name} / {channel_name}"] = residual
                if best is None or residual < best[0]:
                    best = residual, (group_name, group), (channel_name, choice)
        del stats, judged
    return best[1], best[2], residuals


def _refit(recipe: _Recipe, wide: nn.Module, batches: _Batches, group: Choice, channels: Choice):
    """The chosen groups and channels compensated again by the scorer, on ``batches``."""
    if group.weight is not None:
        shape = recipe.arch.block_shape(wide, recipe.config)
        with recipe.watch("attention statistics"):
            attention = attention_stats(wide, recipe.arch, shape, batches.hidden, batches.calls, batches.weights)
        with recipe.watch("selection and refits"):
            group = Choice(group.keep, recipe.scorer.compensate_groups(attention, group.keep))
    half = recipe.half(wide, group)
    with recipe.watch("MLP statistics"):
        stats = mlp_stats(half, recipe.arch, recipe.arch.block_shape(half, recipe.config), batches.hidden,
                          batches.calls, batches.targets, batches.weights)
    del half
    if channels.weight is not None:
        with recipe.watch("selection and refits"):
            channels = Choice(channels.keep, recipe.scorer.compensate_channels(stats, channels.keep))
    return group, channels


def flatten_only(pair: BlockRun, *_, **__) -> tuple[nn.Module, Merge]:
    """The ablation "flatten, do not prune": the wide block (no parameters saved; not a stock checkpoint)."""
    wide = pair.flatten()
    shape = pair.arch.block_shape(wide, pair.model.config)
    p, n = pair.index, pair.count
    return wide, Merge(p, (p, p + n - 1), None, list(range(shape.num_kv_heads)), list(range(shape.intermediate_size)),
                       count=n)


def refit_only(pair: BlockRun, scorer: ChannelScorer, hidden: list[Tensor], calls: list, *, targets=None,
               token_weights=None, device=None, watch=None, **_) -> tuple[nn.Module, Merge]:
    """The ablation "flatten and refit, do not prune": every head and MLP channel of the blocks stays and the
    scorer refits the wide ``down_proj`` to ``targets`` (default: what the blocks compute one after the
    other). Beside the pruned merge, it tells what the pruning costs; beside the absorb, what flattening
    costs before any pruning."""
    recipe = _Recipe(pair, scorer, hidden, calls, token_weights, device, watch)
    wide = recipe.wide()
    shape = recipe.arch.block_shape(wide, recipe.config)
    if recipe.scorer.needs_target and targets is None:
        targets = recipe.targets()
    channels = choose_channels(wide, recipe.arch, recipe.config, scorer, hidden, calls, targets,
                               shape.intermediate_size, torch.arange(shape.intermediate_size), token_weights,
                               recipe.watch)
    merge = recipe.record(Choice(torch.arange(shape.num_kv_heads)), channels)
    with recipe.watch("flatten and prune"):
        block = select_block(wide, recipe.arch, recipe.config, pair.index, merge.keep_groups, merge.keep_channels,
                             down_proj=merge.down_proj)
    return block.to(recipe.home), merge


def prune_attention_only(pair: BlockRun, scorer: ChannelScorer, hidden: list[Tensor], calls: list, *,
                         token_weights=None, device=None, watch=None, **_) -> tuple[nn.Module, Merge]:
    """The ablation "prune the attention only": every MLP channel of the blocks stays."""
    recipe = _Recipe(pair, scorer, hidden, calls, token_weights, device, watch)
    wide = recipe.wide()
    groups = recipe.groups(wide, None)
    half = recipe.half(wide, groups)
    channels = Choice(torch.arange(recipe.arch.block_shape(wide, recipe.config).intermediate_size))
    return half.to(recipe.home), recipe.record(groups, channels)


def prune_mlp_only(pair: BlockRun, scorer: ChannelScorer, hidden: list[Tensor], calls: list, *,
                   targets=None, token_weights=None, device=None, watch=None, **_) -> tuple[nn.Module, Merge]:
    """The ablation "prune the MLP only": every head of the blocks stays."""
    recipe = _Recipe(pair, scorer, hidden, calls, token_weights, device, watch)
    wide = recipe.wide()
    groups = Choice(torch.arange(recipe.arch.block_shape(wide, recipe.config).num_kv_heads))
    half = recipe.half(wide, groups)
    channels = recipe.channels(half, targets, None)
    with recipe.watch("flatten and prune"):
        block = select_block(wide, recipe.arch, recipe.config, pair.index, groups.keep, channels.keep,
                             down_proj=channels.weight)
    return block.to(recipe.home), recipe.record(groups, channels)


RECIPES = {True: merge_pair, False: flatten_only, "refit": refit_only, "attention": prune_attention_only,
           "mlp": prune_mlp_only}
