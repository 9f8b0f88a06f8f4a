"""The one-block fallback (``Flattener(one_block_fallback=...)``): after a pair is merged, keep whichever of
the merged block and the two blocks that keep one of the pair whole does best."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from flatten.calibration import on_device, run_block, token_rows
from flatten.models.dispatch import device_of
from flatten.pair import BlockPair
from flatten.plan import Merge


def block_outputs(block: nn.Module, hidden: list[Tensor], calls: list, device) -> Iterator[Tensor]:
    """``block``'s output on each batch in turn (not all held at once), computed on ``device``."""
    with on_device(block, device):
        for x, call in zip(hidden, calls):
            yield run_block(block, [x], [call])[0]


def squares(a: Iterable[Tensor], b: list[Tensor], weights: list[Tensor] | None) -> float:
    """``sum ||a - b||^2`` over the batches' tokens, each token's squares times its weight, if any."""
    total = 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        per_token = (token_rows(x).double() - token_rows(y).double()).square().sum(-1)
        total += float(per_token @ weights[i].to(per_token) if weights else per_token.sum())
    return total


def one_block_fallback(pair: BlockPair, block: nn.Module, merge: Merge, judge: str | Callable[[nn.Module], float],
                       hidden: list[Tensor], calls: list, first: list[Tensor] | None, targets: list[Tensor] | None,
                       weights: list[Tensor] | None, device) -> tuple[nn.Module, Merge, dict]:
    """The best of the merged ``block`` (recorded by ``merge``) and the two blocks that keep one of the pair
    whole, with the record of the choice. ``judge``: ``"reconstruction"`` (the share of the pair's change to
    its input, ``targets - hidden``, that each candidate misses: 0 exact, 1 no better than an identity;
    ``first``: the first block's output) or a function giving the model's loss with a candidate in place of
    the pair."""
    if callable(judge):
        key, errors = "loss", {name: judge(candidate) for name, candidate in
                               (("merged", block), ("first block only", pair.first), ("second block only", pair.second))}
    else:
        change = max(squares(targets, hidden, weights), torch.finfo(torch.float64).tiny)
        key, errors = "unexplained", {
            "merged": squares(block_outputs(block, hidden, calls, device), targets, weights) / change,
            "first block only": squares(first, targets, weights) / change,
            "second block only": squares(block_outputs(pair.second, hidden, calls, device), targets, weights) / change}
    chosen = min(errors, key=errors.get)
    choice = {"span": list(merge.span), "chosen": chosen, key: errors}
    if chosen != "merged":
        want = pair.arch.shape_of(pair.model.config)
        g, f, offset = want.num_kv_heads, want.intermediate_size, 0 if chosen == "first block only" else 1
        merge = Merge(pair.index, merge.span, merge.similarity, list(range(offset * g, (offset + 1) * g)),
                      list(range(offset * f, (offset + 1) * f)))
        block = pair.prune(pair.flatten(), merge.keep_groups, merge.keep_channels).to(device_of(pair.first))
    return block, merge, choice
