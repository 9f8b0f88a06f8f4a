"""What every depth-reduction strategy shares, and the registry of strategies by name.

A strategy is a ``Compressor`` subclass: built on a model and calibration token ids, its
``compress(remove=K | ratio=R)`` changes the model in place and returns ``(model, record)``, where the model
is a stock checkpoint of its family with fewer blocks and the record says what was done (``.method``,
``.save(path)``). ``Flattener`` (FlattenGPT) and the baselines of ``flatten.strategies.baselines`` are registered here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from flatten.calibration import LayerInputs, capture, check_calibration, on_device, run_block
from flatten.checks import check_fraction, check_int
from flatten.models.architectures import architecture_for
from flatten.models.dispatch import check_offloaded, device_of
from flatten.models.loading import count_parameters, resolve_device
from flatten.registry import Registry


class Decisions(Protocol):
    """What ``compress`` returns beside the model, for every strategy: FlattenGPT's ``Plan``, a baseline's
    ``Removal``. ``RunRecord`` (``flatten.run.report``) holds ``method`` and ``describe()``; ``save`` writes it
    beside the checkpoint."""

    method: dict  # the strategy's name, options and bookkeeping
    file_name: str  # its file beside a saved checkpoint: plan.json, removal.json

    def describe(self) -> str: ...

    def save(self, path: str | Path) -> Path: ...


class Compressor:
    """Base of the strategies: validated calibration in batches, the block count to remove, layer inputs.

    ``device`` is where blocks are computed (default: where the model is); the model may stay elsewhere.
    """

    name = "?"  # the registered name
    title = "?"  # the method and where it comes from, for model cards

    def __init__(self, model: nn.Module, calibration: Tensor, batch_size: int = 4,
                 device: str | torch.device | None = None, progress: bool = True):
        self.model = model
        self.arch = architecture_for(model)
        self.arch.shape_of(model.config)  # the heads split evenly into KV groups
        for block in self.arch.layers_of(model):
            self.arch.check_block(block)  # pre-norm blocks with the parts the architecture names
        check_offloaded(model)
        check_calibration(model, calibration)
        check_int("batch_size", batch_size)
        self.calibration, self.batch_size = calibration, batch_size
        self.batches = list(calibration.split(batch_size))
        self.progress = progress
        self.device = resolve_device(device) if device is not None else device_of(model)

    def blocks_for_ratio(self, ratio: float) -> int:
        """Blocks to remove so that about ``ratio`` of all parameters (embeddings included) go."""
        check_fraction("ratio", ratio, "a fraction of the parameters")
        per_block = sum(p.numel() for p in self.arch.layers_of(self.model)[0].parameters())
        return max(1, round(ratio * count_parameters(self.model) / per_block))

    def default_removals(self) -> int | None:
        """Blocks removed when ``compress`` gets neither ``remove`` nor ``ratio``, where the strategy's options
        fix it (FlattenGPT with fixed spans); None where they do not."""
        return None

    def blocks_to_remove(self, remove: int | None = None, ratio: float | None = None) -> int:
        """The number of blocks that ``compress(remove=, ratio=)`` would remove; raises if it is out of range."""
        if remove is None and ratio is None and self.default_removals() is not None:
            return self.default_removals()
        if (remove is None) == (ratio is None):
            raise ValueError("give exactly one of remove (blocks) or ratio (fraction of parameters)")
        count = len(self.arch.layers_of(self.model))
        k = self.blocks_for_ratio(ratio) if ratio is not None else remove
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= count - 1:
            raise ValueError(f"cannot remove {k!r} of {count} blocks: remove must be an int from 1 to {count - 1}")
        return k

    def compress(self, remove: int | None = None, ratio: float | None = None) -> tuple[nn.Module, Decisions]:
        raise NotImplementedError

    def capture_inputs(self, batches: list[Tensor] | None = None) -> LayerInputs:
        """The first block's input on ``batches`` (default: the calibration batches) and every block's other
        arguments, on the computing device."""
        return capture(self.model, self.arch, batches or self.batches).to(self.device)

    def run_layer(self, block: nn.Module, hidden: list[Tensor], calls: list, name: str) -> list[Tensor]:
        """``block``'s outputs on ``hidden`` (one tensor per batch), computed on the computing device."""
        with on_device(block, self.device):
            return run_block(block, hidden, calls, name=name)

    def block_inputs(self, batches: list[Tensor]):
        """Yield ``(i, input of block i on batches, block i's other arguments)`` for every block, each input
        computed from the last; between steps the caller may change the model from block ``i`` on, as long as
        block ``i`` is as it was when the step ends."""
        layers = self.arch.layers_of(self.model)
        inputs = self.capture_inputs(batches)
        hidden = inputs.hidden
        for i in range(len(layers)):
            yield i, hidden, inputs.calls[i]
            if i + 1 < len(layers):
                hidden = self.run_layer(layers[i], hidden, inputs.calls[i], name=f"block {i}")


STRATEGIES: Registry[type[Compressor]] = Registry("strategy")
DEFAULT_RECIPE = "cut-absorb"  # the strategy that flatten compress and compare.py run unless told otherwise


def register_strategy(name: str, *, replace: bool = False):
    """Class decorator: register a ``Compressor`` subclass under ``name``."""

    def decorate(cls: type[Compressor]) -> type[Compressor]:
        if not (isinstance(cls, type) and issubclass(cls, Compressor)):
            raise TypeError(f"a strategy must be a Compressor subclass, got {cls!r}")
        STRATEGIES.register(name, cls, replace=replace)
        return cls

    return decorate


def get_strategy(name: str) -> type[Compressor]:
    """The strategy registered under ``name`` (``import flatten`` registers the built-in ones)."""
    return STRATEGIES.get(name)
