"""``BlockPair`` and ``BlockRun``: two (or more) adjacent decoder blocks of one model, and what can be done with
them."""

from __future__ import annotations

from torch import Tensor, nn

from flatten.merge import flatten_run, prune_block, replace_span
from flatten.models.architectures import architecture_for


def _position(layers: nn.ModuleList, block, what: str) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, nn.Module)):
        raise TypeError(f"{what} block must be a layer index or a layer module, got {type(block).__name__}")
    if isinstance(block, int):
        if not 0 <= block < len(layers):
            raise ValueError(f"{what} block index {block} is out of range for a model with {len(layers)} blocks")
        return block
    for position, layer in enumerate(layers):
        if layer is block:
            return position
    raise ValueError(f"{what} block is not a layer of this model")


class BlockRun:
    """Blocks ``index`` .. ``index + count - 1`` of ``model`` (``count >= 2``), to be flattened into one.

    Any of them may be the result of an earlier step. ``flatten`` and ``prune`` build new blocks and leave
    the model alone; ``replace`` puts a block in place of the run (the run is then used up)."""

    def __init__(self, model: nn.Module, index, count: int = 2):
        self.model = model
        self.arch = architecture_for(model)
        layers = self.arch.layers_of(model)
        self.index = _position(layers, index, "first")
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise ValueError(f"a run flattens at least two blocks, got count={count!r}")
        if self.index + count > len(layers):
            raise ValueError(f"blocks {self.index} to {self.index + count - 1} do not exist in a model of "
                             f"{len(layers)} blocks")
        self.count = count
        self._used = False

    def _layers(self) -> nn.ModuleList:
        if self._used:
            raise RuntimeError(f"this {type(self).__name__} was already replaced in its model; make a new one")
        return self.arch.layers_of(self.model)

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self._layers()[self.index : self.index + self.count])

    @property
    def first(self) -> nn.Module:
        return self._layers()[self.index]

    def flatten(self) -> nn.Module:
        """The wide block of docs/method.md section 2 (a new module; the model is not changed). Where the
        family's norms keep it from being the blocks side by side (``flatten.merge.flatten_run``), it refuses
        to compute and prunes back only to one block's attention and MLP whole, with the reason."""
        return flatten_run(self.blocks, self.arch, self.model.config, self.index)

    def prune(self, wide: nn.Module, keep_groups, keep_channels, o_proj: Tensor | None = None,
              down_proj: Tensor | None = None) -> nn.Module:
        """``wide`` shrunk to the model's own width (see ``flatten.merge.prune_block``)."""
        self._layers()
        return prune_block(wide, self.arch, self.model.config, self.index, keep_groups, keep_channels,
                           o_proj=o_proj, down_proj=down_proj)

    def replace(self, block: nn.Module) -> nn.Module:
        """Put ``block`` in place of the run in the model (in place); return the model."""
        self._layers()
        replace_span(self.model, self.index, self.index + self.count, block, self.arch)
        self._used = True
        return self.model

    def __repr__(self) -> str:
        return f"BlockRun(blocks {self.index} to {self.index + self.count - 1} of {type(self.model).__name__})"


class BlockPair(BlockRun):
    """Blocks ``index`` and ``index + 1`` of ``model``.

    Either may be the result of an earlier flatten-and-prune. ``flatten`` and ``prune`` build new blocks
    and leave the model alone; ``replace`` puts a block in place of the pair (the pair is then used up).

        pair = BlockPair(model, 20)                 # or BlockPair(model, block_a, block_b)
        wide = pair.flatten()                       # 2H heads, 2K KV heads, 2F channels
        small = pair.prune(wide, keep_groups, keep_channels)
        pair.replace(small)                         # model now has one block fewer
    """

    def __init__(self, model: nn.Module, first, second=None):
        layers = architecture_for(model).layers_of(model)
        index = _position(layers, first, "first")
        other = index + 1 if second is None else _position(layers, second, "second")
        if other != index + 1:
            raise ValueError(f"blocks {index} and {other} are not adjacent (the second must directly follow the first)")
        if other >= len(layers):
            raise ValueError(f"block {index} is the last of {len(layers)} blocks and has no successor to pair with")
        super().__init__(model, index, 2)

    @property
    def second(self) -> nn.Module:
        return self._layers()[self.index + 1]

    def __repr__(self) -> str:
        return f"BlockPair(blocks {self.index} and {self.index + 1} of {type(self.model).__name__})"
