"""Projections kept in one fused weight (Phi-3's ``qkv_proj`` and ``gate_up_proj``), seen by the rest of the
library as virtual projections q/k/v/gate/up: slices of the fused weight's rows, split when a block is read and
stacked again when one is built. ``Architecture.fused`` declares them; ``Architecture.projections`` reads them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

FUSABLE = {  # projections one fused weight may hold (rows stacked), with the rows each takes in a block
    "q_proj": "num_heads * head_dim (the columns of o_proj)",
    "k_proj": "num_kv_heads * head_dim (as many as v_proj)",
    "v_proj": "num_kv_heads * head_dim (as many as k_proj)",
    "gate_proj": "intermediate_size (the columns of down_proj)",
    "up_proj": "intermediate_size (the columns of down_proj)",
}
_SUBLAYER = {field: "attention" if field in ("q_proj", "k_proj", "v_proj") else "MLP" for field in FUSABLE}


def check_fusions(model_type: str, fused, named: dict[str, str]) -> None:
    """Refuse a declaration of fused projections (``Architecture.fused``) the kernel cannot split and fuse back;
    ``named``: the paths the architecture already names (the fused ones are added)."""
    seen: dict[str, str] = {}
    for entry in fused:
        path, fields = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, None)
        if not isinstance(path, str) or not isinstance(fields, tuple) or len(fields) < 2:
            raise ValueError(f"architecture {model_type!r} declares the fusion {entry!r}; each is (path of the fused "
                             "weight, (two or more of " + ", ".join(FUSABLE) + ") in row order)")
        for field in fields:
            if field not in FUSABLE:
                known = "; ".join(f"{key}: {rows}" for key, rows in FUSABLE.items())
                raise ValueError(f"architecture {model_type!r} fuses {field!r} into {path!r}; the kernel splits only "
                                 f"projections that read a norm's output, by rows ({known})")
            if field in seen:
                raise ValueError(f"architecture {model_type!r} fuses {field} twice, into {seen[field]!r} and {path!r}")
            seen[field] = path
        if len({_SUBLAYER[field] for field in fields}) > 1:
            raise ValueError(f"architecture {model_type!r} fuses {', '.join(fields)} into {path!r}: attention and "
                             "MLP projections read different norms and cannot share one weight")
        if path in named:
            raise ValueError(f"architecture {model_type!r} names {path!r} twice, as {named[path]} and as a fused "
                             "projection")
        named[path] = "a fused projection"


@dataclass(frozen=True)
class Projections:
    """A family's projections as a block holds them: ``fused`` maps each fused weight's path to the paths of the
    virtual projections it holds, in row order (empty: every projection is its own module); the other fields
    are the paths whose widths split a fused weight's rows."""

    fused: dict[str, tuple[str, ...]]
    q_proj: str
    gate_proj: str
    up_proj: str
    o_proj: str
    down_proj: str

    def modules(self, paths: tuple[str, ...]) -> tuple[str, ...]:
        """The modules a block really has for ``paths``: a fused projection in place of its virtual ones (once)."""
        holder = {part: path for path, parts in self.fused.items() for part in parts}
        return tuple(dict.fromkeys(holder.get(path, path) for path in paths))

    def split_rows(self, fused: str, rows: int, attention_width: int, channels: int) -> list[int]:
        """The rows of each virtual projection in the fused weight ``fused`` of ``rows`` rows, in a block whose
        ``o_proj`` reads ``attention_width`` columns (query heads x head_dim) and whose ``down_proj`` reads
        ``channels``: q_proj takes ``attention_width``, gate_proj and up_proj ``channels`` each, k_proj and
        v_proj the rest in equal parts."""
        parts = self.fused[fused]
        known = {self.q_proj: attention_width, self.gate_proj: channels, self.up_proj: channels}
        unknown = [part for part in parts if part not in known]
        rest = rows - sum(known[part] for part in parts if part in known)
        if rest < 0 or (rest % len(unknown) if unknown else rest):
            raise ValueError(f"{fused} has {rows} rows, which do not split into {', '.join(parts)} of a block whose "
                             f"o_proj reads {attention_width} and down_proj {channels} columns")
        return [known[part] if part in known else rest // len(unknown) for part in parts]

    def split(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` (a block's tensors by name) with each fused weight (and bias) split into its virtual
        projections' (views, not copies)."""
        if not self.fused:
            return state
        state = dict(state)
        widths = state[f"{self.o_proj}.weight"].shape[1], state[f"{self.down_proj}.weight"].shape[1]
        for fused, parts in self.fused.items():
            rows = self.split_rows(fused, state[f"{fused}.weight"].shape[0], *widths)
            for kind in ("weight", "bias"):
                tensor = state.pop(f"{fused}.{kind}", None)
                if tensor is not None:
                    state.update({f"{part}.{kind}": t for part, t in zip(parts, tensor.split(rows))})
        return state

    def fuse(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` with the virtual projections of each fused weight (and bias) stacked into it again."""
        if not self.fused:
            return state
        state = dict(state)
        for fused, parts in self.fused.items():
            for kind in ("weight", "bias"):
                present = [f"{part}.{kind}" in state for part in parts]
                if any(present) and not all(present):
                    raise ValueError(f"only some of {', '.join(parts)} have a {kind}; {fused} holds all or none")
                if all(present):
                    state[f"{fused}.{kind}"] = torch.cat([state.pop(f"{part}.{kind}") for part in parts])
        return state

    def of(self, block: nn.Module, path: str) -> tuple[Tensor, Tensor | None]:
        """The weight and bias (or None) of the projection ``path`` of ``block``, a real or a virtual one (a
        slice of its fused weight)."""
        for fused, parts in self.fused.items():
            if path in parts:
                module = block.get_submodule(fused)
                rows = self.split_rows(fused, module.weight.shape[0], block.get_submodule(self.o_proj).weight.shape[1],
                                       block.get_submodule(self.down_proj).weight.shape[1])
                i = parts.index(path)
                start = sum(rows[:i])
                bias = None if module.bias is None else module.bias[start : start + rows[i]]
                return module.weight[start : start + rows[i]], bias
        module = block.get_submodule(path)
        return module.weight, getattr(module, "bias", None)
