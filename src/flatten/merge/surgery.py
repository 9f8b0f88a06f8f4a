"""Model surgery: put a new block in place of a span of blocks and keep the model a stock checkpoint."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from flatten.models.architectures import Architecture, architecture_for
from flatten.models.dispatch import place_like, refresh_device_map


def renumber_layers(model: nn.Module, arch: Architecture | None = None) -> None:
    """Set every ``layer_idx`` (the KV cache is indexed by it) to the block's position, and the blocks'
    entries of a dispatched model's ``hf_device_map``."""
    arch = arch or architecture_for(model)
    layers = arch.layers_of(model)
    for position, block in enumerate(layers):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    refresh_device_map(model, arch.layers, layers)


def replace_span(model: nn.Module, start: int, stop: int, block: nn.Module,
                 arch: Architecture | None = None) -> nn.Module:
    """Replace blocks ``start .. stop-1`` of ``model`` (in place) with ``block``; return the model.

    Renumbers ``layer_idx``, shrinks per-layer config lists (the span keeps its first layer's entry: a block
    whose attention was built for another entry of ``layer_types``, e.g. Gemma 3's sliding-window or global
    attention, is refused), lowers leading-layer counts and sets the layer count.
    """
    arch = arch or architecture_for(model)
    layers = arch.layers_of(model)
    count = len(layers)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in (start, stop)):
        raise TypeError(f"start and stop must be ints, got {start!r} and {stop!r}")
    if not 0 <= start < stop <= count:
        raise ValueError(f"span [{start}, {stop}) is not a non-empty range of the model's {count} blocks")
    if not isinstance(block, nn.Module):
        raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")
    if type(block) is not type(layers[start]):
        raise TypeError(f"block is a {type(block).__name__}, the model's blocks are {type(layers[start]).__name__}")
    built_as = {m.layer_type for m in block.modules() if isinstance(getattr(m, "layer_type", None), str)}
    types = getattr(model.config, "layer_types", None)
    if built_as and isinstance(types, (list, tuple)) and len(types) == count and built_as != {types[start]}:
        raise ValueError(f"the block was built as a {', '.join(sorted(built_as))} layer, but block {start}, whose "
                         f"config entry it takes, is a {types[start]} layer (its attention mask and RoPE)")

    remove_blocks(model, range(start + 1, stop), arch)
    layers[start] = place_like(block, layers[start])
    renumber_layers(model, arch)
    return model


def remove_blocks(model: nn.Module, indices, arch: Architecture | None = None) -> nn.Module:
    """Delete the blocks at ``indices`` (in place); return the model.

    Renumbers ``layer_idx``, drops the removed blocks' entries of per-layer config lists, lowers
    leading-layer counts and sets the layer count: the model stays a stock checkpoint of its family.
    """
    arch = arch or architecture_for(model)
    layers = arch.layers_of(model)
    count = len(layers)
    removed = sorted(set(indices))
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in removed):
        raise ValueError(f"blocks to remove must be ints in [0, {count}), got {list(indices)!r}")
    if len(removed) >= count:
        raise ValueError(f"cannot remove all {count} blocks")
    config = model.config
    updates = {arch.num_layers_field: count - len(removed)}
    for field in arch.per_layer_fields:
        values = getattr(config, field, None)
        if isinstance(values, (list, tuple)):
            if len(values) != count:
                raise ValueError(f"config.{field} has {len(values)} entries for {count} blocks")
            updates[field] = type(values)(v for i, v in enumerate(values) if i not in removed)
    for field in arch.layer_count_fields:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool):
            updates[field] = value - sum(1 for i in removed if i < value)
    for field, value in updates.items():
        setattr(config, field, value)
    for index in reversed(removed):
        del layers[index]
    renumber_layers(model, arch)
    return model


@contextmanager
def swapped_blocks(layers: nn.ModuleList, start: int, stop: int, replacement: list[nn.Module]):
    """Blocks ``start..stop-1`` of ``layers`` replaced by ``replacement`` for the duration, for trial
    forward passes without a KV cache (the config and ``layer_idx`` are not touched)."""
    originals = [layers[i] for i in range(start, stop)]
    for i in reversed(range(start, stop)):
        del layers[i]
    for offset, block in enumerate(replacement):
        layers.insert(start + offset, block)
    try:
        yield
    finally:
        for _ in replacement:
            del layers[start]
        for offset, block in enumerate(originals):
            layers.insert(start + offset, block)
