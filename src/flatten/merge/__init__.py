"""The flatten-and-prune kernel and the model surgery around it."""

from flatten.merge.kernel import (build_block, flatten_blocks, flatten_run, fold_norms, folded_state, prune_block,
                                  select_block, whole_block)
from flatten.merge.surgery import remove_blocks, renumber_layers, replace_span, swapped_blocks

__all__ = [
    "build_block",
    "flatten_blocks",
    "flatten_run",
    "fold_norms",
    "folded_state",
    "prune_block",
    "remove_blocks",
    "renumber_layers",
    "replace_span",
    "select_block",
    "swapped_blocks",
    "whole_block",
]
