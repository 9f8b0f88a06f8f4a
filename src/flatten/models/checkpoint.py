"""Saving a compressed model as a stock Hugging Face checkpoint, atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from flatten.files import write_folder_atomically
from flatten.models.architectures import architecture_for


def check_stock(model: nn.Module) -> None:
    """Raise if a block's shape differs from what the config declares (e.g. an unpruned wide block):
    ``from_pretrained`` could not load such a checkpoint."""
    arch = architecture_for(model)
    want = arch.shape_of(model.config)
    layers = arch.layers_of(model)
    if len(layers) != getattr(model.config, arch.num_layers_field):
        raise ValueError(f"model has {len(layers)} blocks but its config says {getattr(model.config, arch.num_layers_field)}")
    for index, block in enumerate(layers):
        have = arch.block_shape(block, model.config)
        if have != want:
            raise ValueError(f"block {index} has shape {have}, the config declares {want}: prune wide blocks "
                             "back to the model's width before saving a stock checkpoint")


def save_checkpoint(model: nn.Module, out_dir: str | Path, tokenizer=None, *, overwrite: bool = False,
                    extras: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) with ``save_pretrained`` into ``out_dir``; ``extras(folder)``, if
    given, writes further files (plan, model card) into the folder before it is complete.

    Everything is written to a temporary folder beside ``out_dir`` and renamed into place when complete:
    an interrupted save leaves any earlier content of ``out_dir`` as it was.
    """
    check_stock(model)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if extras is not None:
            extras(staging)

    # beside out_dir, renamed into place; with the modes the umask gives (see flatten.files)
    write_folder_atomically(out_dir, write)
    return out_dir
