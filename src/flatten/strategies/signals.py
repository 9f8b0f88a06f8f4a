"""Signals of the model that strategies and policies read, computed through a ``Compressor``'s walk up the
blocks: the angular distance across a contiguous run of blocks (the angular cut, ReplaceMe, the ``cut``
policies) and the loss of the model from some block on (SLEB, BlockPruner, the loss-search policies, the
one-block fallback)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatten.checks import TOKENS, check_choice
from flatten.evaluation.perplexity import mean_nll
from flatten.merge import swapped_blocks
from flatten.strategies.compressor import Compressor


@torch.no_grad()
def cut_distances(compressor: Compressor, k: int, tokens: str = "all") -> Tensor:
    """For ``compressor``'s model, ``d[s]`` for ``s`` in ``0 .. L - k``: the mean angular distance
    ``arccos(cos) / pi`` between the input of block ``s`` and the input of block ``s + k`` (block ``L``
    meaning the last block's output) over the calibration sequences' tokens (``tokens="all"``) or their last tokens only (``"last"``, the
    choice of Gromov et al. and ReplaceMe). Holds ``k + 1`` block boundaries at a time."""
    check_choice("tokens", tokens, TOKENS)

    def unit_rows(hidden: list[Tensor]) -> Tensor:
        rows = [h[:, -1] if tokens == "last" else h.reshape(-1, h.shape[-1]) for h in hidden]
        return F.normalize(torch.cat(rows).float(), dim=-1)

    def angular(a: Tensor, b: Tensor) -> float:
        return float((torch.arccos(torch.linalg.vecdot(a, b).clamp(-1, 1)) / torch.pi).double().mean())

    layers = compressor.arch.layers_of(compressor.model)
    count = len(layers)
    distances = torch.zeros(count - k + 1, dtype=torch.float64)
    recent: list[Tensor] = []  # unit-norm token rows of the last k + 1 boundaries
    for i, hidden, calls in compressor.block_inputs(compressor.batches):
        recent = (recent + [unit_rows(hidden)])[-(k + 1):]
        if i >= k:
            distances[i - k] = angular(recent[0], recent[-1])
        if i == count - 1:
            output = compressor.run_layer(layers[i], hidden, calls, name=f"block {i}")
            distances[count - k] = angular(recent[-k] if k else unit_rows(output), unit_rows(output))
    return distances


def loss_from(compressor: Compressor, hidden: list[Tensor], stop: int, batches: list[Tensor],
              then: list[nn.Module] = ()) -> float:
    """Mean NLL on ``batches`` of ``compressor``'s model whose blocks ``0 .. stop-1`` are replaced by
    ``hidden`` (recorded activations, one tensor per batch) followed by the blocks ``then``: a trial that
    changes blocks from some point on is scored without running the blocks below it again."""
    with swapped_blocks(compressor.arch.layers_of(compressor.model), 0, stop, [Replay(hidden), *then]):
        return mean_nll(compressor.model, batches)


class Replay(nn.Module):
    """Stands in for the blocks below some point: returns recorded activations, one batch per call."""

    def __init__(self, outputs: list[Tensor]):
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, hidden_states, *args, **kwargs):
        out = self.outputs[self.calls]
        self.calls += 1
        return out.to(hidden_states.device)
