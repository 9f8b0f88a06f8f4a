"""What a channel scorer reads: the calibration statistics of one wide block, its attention first, then its MLP
with the attention already pruned (gathered by ``flatten.calibration``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flatten.models.architectures import BlockShape


@dataclass
class AttentionStats:
    """Attention of a wide block on the calibration tokens. ``o`` stands for the head outputs before
    ``o_proj`` (tokens x heads*head_dim)."""

    shape: BlockShape
    weights: dict[str, Tensor]  # "q", "k", "v", "o" weights of the wide block (out x in)
    gram: Tensor  # sum over tokens of o^T o, float64, (heads*head_dim)^2
    contribution: Tensor  # per query head: mean over tokens of || o_h W_o,h^T ||, float64
    tokens: int

    def group_rows(self, group: int) -> Tensor:
        """Columns of ``o_proj`` (rows of ``gram``) that belong to KV group ``group``."""
        return self.shape.head_rows(torch.tensor([group]))


@dataclass
class MlpStats:
    """MLP of a wide block on the calibration tokens, after the attention was pruned.
    ``psi = act(gate z) * (up z)`` are the channel activations (tokens x channels)."""

    shape: BlockShape
    weights: dict[str, Tensor]  # "gate", "up", "down" weights of the wide block
    gram: Tensor  # sum over tokens of psi^T psi, float64, channels^2
    target_cross: Tensor | None  # sum over tokens of psi^T (y_true - u'), float64, channels x hidden; see needs_target
    tokens: int
    target_energy: float | None = None  # sum over tokens of ||y_true - u'||^2, with target_cross

    def own_cross(self) -> Tensor:
        """``psi^T (psi W_down^T)``: the cross term that fits the wide MLP's own output."""
        return self.gram @ self.weights["down"].double().T
