"""The flatten-and-prune kernel (docs/method.md sections 2 and 3).

Pure functions from blocks to new blocks: the inputs are never modified. The kernel knows blocks only
through an ``Architecture`` description and takes every selection and compensation weight from outside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatten.models.architectures import Architecture, BlockShape
from flatten.models.dispatch import weights_of


def build_block(template: nn.Module, arch: Architecture, config, shape: BlockShape, layer_idx: int,
                state: dict[str, Tensor]) -> nn.Module:
    """A new block of ``template``'s class and of ``shape``, holding exactly the tensors in ``state`` (virtual
    projections of a fused weight stacked into it again: ``Architecture.fused``)."""
    block_config = config if shape == arch.shape_of(config) else arch.config_with_shape(config, shape)
    with torch.device("meta"):
        block = type(template)(block_config, layer_idx)
    block.load_state_dict(arch.projections.fuse(state), strict=True, assign=True)
    left = [name for name, t in list(block.named_parameters()) + list(block.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{type(template).__name__} has state the kernel does not set: {left}")
    return block.train(template.training)


def _state(block: nn.Module, arch: Architecture, device: torch.device | None = None) -> dict[str, Tensor]:
    """The block's tensors by name (offloaded ones loaded), all on ``device`` (default: where the block computes),
    each fused weight split into its virtual projections' (``Architecture.fused``), failing on any tensor the
    architecture description does not cover."""
    state = arch.projections.split(weights_of(block, device))
    covered = {f"{path}.{kind}" for path in arch.norms + arch.attn_readers + arch.mlp_readers + arch.writers
               for kind in ("weight", "bias")}
    unknown = sorted(set(state) - covered)
    if unknown:
        raise ValueError(
            f"{type(block).__name__} holds tensors that architecture {arch.model_type!r} does not describe: "
            f"{unknown}; flattening them is not defined"
        )
    return state


def folded_state(block: nn.Module, arch: Architecture, device: torch.device | None = None) -> dict[str, Tensor]:
    """The block's tensors with each pre-norm's per-channel factor folded into the projections that read it,
    on ``device`` (default: where the block computes).

    ``W <- W * gamma`` (input columns), then the norm's factor becomes 1: an exact rewrite of the block.
    Norms after a sub-layer and q/k norms divide by an RMS taken after their weights would apply: they stay.
    """
    arch.check_block(block)
    state = {name: t.clone() for name, t in _state(block, arch, device).items()}
    for norm, readers in arch.pre_norms:
        gamma = arch.norm_scale(state[f"{norm}.weight"])
        for reader in readers:
            weight = state[f"{reader}.weight"]
            work = torch.promote_types(weight.dtype, torch.float32)
            state[f"{reader}.weight"] = (weight.to(work) * gamma.to(work)).to(weight.dtype)
        state[f"{norm}.weight"] = arch.norm_weight(torch.ones_like(gamma))
    return state


def fold_norms(block: nn.Module, arch: Architecture, config, layer_idx: int) -> nn.Module:
    """A copy of ``block`` with its norm weights folded into its projections (same function)."""
    return build_block(block, arch, config, arch.block_shape(block, config), layer_idx, folded_state(block, arch))


@dataclass(frozen=True)
class Inexact:
    """Why a wide block is not its blocks side by side (``wide.flatten_inexact``), and what lets it be pruned
    back to one block whole exactly. Such a block refuses to compute; ``select_block`` keeps only one block's
    attention (MLP) whole from it, where ``attention`` (``mlp``) says why, and no refit of them."""

    attention: str | None  # why its attention is not the blocks' attentions summed (None: it is)
    mlp: str | None  # why its MLP is not the blocks' MLPs summed (None: it is)
    groups: int  # KV groups of each block
    channels: int  # MLP channels of each block
    norms: tuple[dict[str, Tensor], ...]  # each block's norms the wide block holds only the first's of
    what: str  # which blocks, for messages
    arch: Architecture

    def message(self, what: str, *reasons: str | None) -> str:
        why = "; ".join(reason for reason in reasons if reason)
        return self.arch.refusal(f"{what} the wide block of {self.what}", f"they do not lie side by side exactly: {why}")


def _refuse_to_compute(block: nn.Module, args) -> None:
    inexact = block.flatten_inexact
    raise ValueError(inexact.message("a merge (it scores and keeps heads and channels of several blocks) computing "
                                     "with", inexact.attention, inexact.mlp))


def _differing(states: list[dict[str, Tensor]], paths: tuple[str, ...]) -> list[str]:
    return [path for path in paths
            if any(not torch.equal(states[0][f"{path}.weight"], other[f"{path}.weight"]) for other in states[1:])]


def _biases(states: list[dict[str, Tensor]], key: str) -> list[Tensor] | None:
    """Each block's bias ``key``, or None where no block has it (refused where only some have it)."""
    present = [key in state for state in states]
    if any(present) and not all(present):
        raise ValueError(f"only some of the blocks have {key!r}; all must have it or none")
    return [state[key] for state in states] if all(present) else None


def _side_by_side(states: list[dict[str, Tensor]], arch: Architecture) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """The wide block's tensors from the blocks' folded ones, and the norms it holds only the first block's of."""
    first = states[0]
    wide = {f"{norm}.weight": first[f"{norm}.weight"] for norm in arch.norms}
    shared = ()
    if arch.q_norm is not None and arch.qk_norm == "channel":
        for norm in (arch.q_norm, arch.k_norm):
            wide[f"{norm}.weight"] = torch.cat([state[f"{norm}.weight"] for state in states])
    elif arch.q_norm is not None:
        shared = (arch.q_norm, arch.k_norm)
    shared += tuple(path for path in (arch.attn_post_norm, arch.mlp_post_norm) if path is not None)
    for reader in arch.attn_readers + arch.mlp_readers:
        wide[f"{reader}.weight"] = torch.cat([state[f"{reader}.weight"] for state in states], dim=0)
        biases = _biases(states, f"{reader}.bias")
        if biases is not None:
            wide[f"{reader}.bias"] = torch.cat(biases, dim=0)
    for writer in arch.writers:
        wide[f"{writer}.weight"] = torch.cat([state[f"{writer}.weight"] for state in states], dim=1)
        biases = _biases(states, f"{writer}.bias")
        if biases is not None:
            wide[f"{writer}.bias"] = sum(biases[1:], biases[0])
    return wide, shared


def flatten_blocks(first: nn.Module, second: nn.Module, arch: Architecture, config, layer_idx: int) -> nn.Module:
    """One wide block computing ``u = x + A1(N1 x) + A2(N2 x)``, ``y = u + M1(N1' u) + M2(N2' u)``: the two
    blocks side by side (``flatten_run`` of the pair, where the rest is documented)."""
    return flatten_run((first, second), arch, config, layer_idx)


def flatten_run(blocks: Sequence[nn.Module], arch: Architecture, config, layer_idx: int) -> nn.Module:
    """One wide block computing ``u = x + sum_i A_i(N_i x)``, ``y = u + sum_i M_i(N_i' u)`` for the ``n >= 2``
    ``blocks``: their attention heads and MLP channels side by side.

    Heads are concatenated as "all of block 1, then all of block 2, ...", so KV head ``j`` keeps serving
    query heads ``j*G .. j*G+G-1`` and stock GQA code computes the wide block correctly. The wide block is
    built where the first block computes; the others' weights are read onto that device (the blocks of a model
    dispatched by accelerate may live on different devices, or offloaded to CPU memory or disk).

    Exact where the family's norms allow: pre-norms fold; a q/k norm of one weight per head (Qwen3) is shared
    by all heads of the wide block, which is exact only where the blocks' q/k norm weights are equal.
    Otherwise (those weights differ, a q/k norm over all heads, a norm after a sub-layer) the wide block holds
    the first block's norms (q/k norms over all heads side by side), carries ``flatten_inexact`` (an
    ``Inexact``) and refuses to compute: pruned back to one block's attention and MLP whole it gives that
    block exactly (an absorb, a drop); anything else is refused with the reason.
    """
    blocks = list(blocks)
    if len(blocks) < 2:
        raise ValueError(f"flattening needs at least two blocks, got {len(blocks)}")
    for other in blocks[1:]:
        if type(other) is not type(blocks[0]):
            raise TypeError(f"cannot flatten a {type(blocks[0]).__name__} with a {type(other).__name__}")
    shape = arch.block_shape(blocks[0], config)
    for other in blocks[1:]:
        if arch.block_shape(other, config) != shape:
            raise ValueError(f"blocks of different shapes cannot be flattened: {shape} vs "
                             f"{arch.block_shape(other, config)}")
    states = [folded_state(blocks[0], arch)]
    device = next(iter(states[0].values())).device
    states += [folded_state(block, arch, device) for block in blocks[1:]]
    first = states[0]
    for state in states[1:]:
        for name in first:
            if name in state and first[name].dtype != state[name].dtype:
                raise ValueError(f"{name} has dtype {first[name].dtype} in one block and {state[name].dtype} in another")

    wide, shared = _side_by_side(states, arch)
    n = len(blocks)
    wide_shape = BlockShape(n * shape.num_heads, n * shape.num_kv_heads, shape.head_dim, n * shape.intermediate_size)
    block = build_block(blocks[0], arch, config, wide_shape, layer_idx, wide)
    attention = arch.attention_inexact
    if attention is None and arch.q_norm is not None:
        differ = _differing(states, (arch.q_norm, arch.k_norm))
        if differ:
            attention = (f"their {' and '.join(differ)} weights differ, and a wide block has one of each, shared by "
                         "all its heads")
    if attention is not None or arch.mlp_inexact is not None:
        norms = tuple({f"{path}.weight": state[f"{path}.weight"] for path in shared} for state in states)
        what = f"blocks {layer_idx} and {layer_idx + 1}" if n == 2 else f"blocks {layer_idx} to {layer_idx + n - 1}"
        block.flatten_inexact = Inexact(attention, arch.mlp_inexact, shape.num_kv_heads, shape.intermediate_size,
                                        norms, what, arch)
        block.register_forward_pre_hook(_refuse_to_compute)
    return block


def _selection(indices, name: str, count: int | None, available: int) -> Tensor:
    """Validated, sorted, unique indices as a long tensor."""
    if isinstance(indices, (str, bytes)) or not isinstance(indices, (Sequence, Tensor)) and not hasattr(indices, "__array__"):
        raise TypeError(f"{name} must be a sequence of integers, got {type(indices).__name__}")
    try:
        t = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a sequence of integers, got {indices!r}") from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    t = t.reshape(-1).long().cpu()
    if count is not None and t.numel() != count:
        raise ValueError(f"{name} must select exactly {count} of {available}, got {t.numel()}")
    if t.numel() == 0:
        raise ValueError(f"{name} selects nothing")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= available):
        raise ValueError(f"{name} must lie in [0, {available}), got values from {int(t.min())} to {int(t.max())}")
    t = torch.sort(t).values
    if t.numel() > 1 and bool((t[1:] == t[:-1]).any()):
        raise ValueError(f"{name} holds repeated indices")
    return t


def _replacement(weight, name: str, like: Tensor) -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(weight).__name__}")
    if tuple(weight.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have shape {tuple(like.shape)} (out x in of the pruned block), "
                         f"got {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name} holds non-finite values")
    return weight.detach().to(dtype=like.dtype, device=like.device).clone()


def whole_block(kept: Tensor, count: int, available: int) -> int | None:
    """``i`` where ``kept`` (sorted) is all of block ``i``'s ``count`` groups or channels in a wide block of
    ``available`` (blocks side by side, ``count`` each), else None."""
    if kept.numel() != count:
        return None
    side = int(kept[0]) // count
    return side if side * count < available and torch.equal(kept, torch.arange(side * count, (side + 1) * count)) else None


def _sides(block: nn.Module, arch: Architecture, have: BlockShape, groups: Tensor, channels: Tensor,
           o_proj, down_proj) -> dict[str, Tensor]:
    """The norm weights a selection of ``block`` must hold (those of the block kept whole, from a wide block
    that could not hold every block's); raises where the selection would not compute what it claims.

    From a wide block whose blocks do not lie side by side (``Inexact``), each sub-layer must be one block's
    whole, not refitted, its q/k norms and its norm after the sub-layer with it; a block's attention kept whole
    in place of blocks whose per-layer config entries differ (Gemma 3's sliding-window and global layers) is
    refused, since the new block takes the first block's entry (mask, RoPE). Two exceptions, on a family whose
    ``down_proj`` refits run through its norm after the MLP approximately (``Architecture.refit_approximation``):
    one block's MLP whole with a refit ``down_proj`` (an absorb: fitted through that block's norm, which it
    keeps), and the MLP channels of several blocks, not refitted, in a selection wider than one block: the
    block a refit gathers its statistics on up to ``down_proj``, holding the norm after the MLP of the block
    whose attention it keeps (it computes the blocks' MLPs summed before that one norm, which is not the
    blocks side by side; a stock-width selection of several blocks' channels is refused).
    """
    inexact: Inexact | None = getattr(block, "flatten_inexact", None)
    if inexact is None:
        if arch.q_norm is not None and arch.qk_norm == "channel" and groups.numel() != have.num_kv_heads:
            raise ValueError(arch.refusal("keeping some KV groups of a block", arch.attention_inexact))
        for weight, name, why in ((o_proj, "o_proj", arch.attn_post_norm and arch.attention_inexact),
                                  (down_proj, "down_proj", arch.mlp_inexact)):
            if weight is not None and why:
                raise ValueError(arch.refusal(f"a refit {name}", why))
        return {}
    side = {"attention": whole_block(groups, inexact.groups, have.num_kv_heads),
            "mlp": whole_block(channels, inexact.channels, have.intermediate_size)}
    _check_layer_entries(block, arch, inexact, side["attention"])
    mlp_why = inexact.mlp or arch.mlp_post_norm_inexact
    approximate = inexact.mlp is None and arch.refit_approximation is not None
    refit = {"attention": o_proj is not None, "mlp": down_proj is not None and not (approximate and side["mlp"] is not None)}
    statistics = (approximate and down_proj is None and side["mlp"] is None
                  and channels.numel() > inexact.channels)  # the wide MLP a refit gathers statistics on
    norms = {}
    for part, why in (("attention", inexact.attention), ("mlp", mlp_why)):
        if why is None:
            continue
        kept = side[part]
        if part == "mlp" and statistics:
            kept = side["attention"] if side["attention"] is not None else 0
        elif kept is None or refit[part]:
            what = ("a merge keeping KV groups of several blocks or refitting o_proj from" if part == "attention" else
                    "a merge or an absorb keeping MLP channels of several blocks or refitting down_proj from")
            raise ValueError(inexact.message(what, why))
        post = arch.attn_post_norm if part == "attention" else arch.mlp_post_norm
        paths = {arch.q_norm, arch.k_norm, post} if part == "attention" else {post}
        norms.update({key: t for key, t in inexact.norms[kept].items() if key.rsplit(".", 1)[0] in paths})
    return norms


def _check_layer_entries(block: nn.Module, arch: Architecture, inexact: Inexact, attention: int | None) -> None:
    """Refuse keeping block ``attention`` (> 0) of a wide block whole where its per-layer config entries differ
    from the first block's, which the new block takes (read off the config the wide block was built with, at
    its ``layer_idx``)."""
    config = getattr(block, "config", None)
    index = next((m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)), None)
    if not attention or config is None or index is None:
        return
    pair = {i: {field: list(getattr(config, field))[i] for field in arch.per_layer_fields
                if isinstance(getattr(config, field, None), (list, tuple)) and len(getattr(config, field)) > i}
            for i in (index, index + attention)}
    if pair[index] != pair[index + attention]:
        entries = "; ".join(f"{field}: {pair[index + attention][field]} (block {index + attention}), "
                            f"{value} (block {index})" for field, value in pair[index].items()
                            if pair[index + attention].get(field) != value)
        raise ValueError(arch.refusal(
            f"keeping block {index + attention}'s attention whole in place of {inexact.what}",
            f"their per-layer config entries differ ({entries}) and the new block takes block {index}'s, whose "
            "attention mask and RoPE that attention was not trained with"))


def select_block(block: nn.Module, arch: Architecture, config, layer_idx: int, keep_groups, keep_channels,
                 o_proj: Tensor | None = None, down_proj: Tensor | None = None) -> nn.Module:
    """A block holding only ``keep_groups`` (a KV head and its query heads each) and ``keep_channels``
    (MLP channels) of ``block``, of any width; ``o_proj``/``down_proj`` optionally replace the writers'
    weights (compensation). Selections are sorted ascending; replacement weights are laid out in that order.

    Refused where the result would not compute what it claims: some KV groups of a block whose q/k norms run
    over all heads, a refit writer followed by a norm, and, from a wide block that is not its two blocks side
    by side (``Inexact``), anything but one block's attention (MLP) whole, not refitted.
    """
    have = arch.block_shape(block, config)
    groups = _selection(keep_groups, "keep_groups", None, have.num_kv_heads)
    channels = _selection(keep_channels, "keep_channels", None, have.intermediate_size)
    q_rows = have.head_rows(groups)
    k_rows = have.kv_rows(groups)
    norms = _sides(block, arch, have, groups, channels, o_proj, down_proj)

    state = {name: t.clone() for name, t in _state(block, arch).items()}
    state.update({key: t.to(state[key].device).clone() for key, t in norms.items()})

    def take(path: str, rows: Tensor, dim: int, bias: bool) -> None:
        key = f"{path}.weight"
        state[key] = state[key].index_select(dim, rows.to(state[key].device))
        if bias and f"{path}.bias" in state:
            state[f"{path}.bias"] = state[f"{path}.bias"].index_select(0, rows.to(state[key].device))

    take(arch.q_proj, q_rows, 0, bias=True)
    take(arch.k_proj, k_rows, 0, bias=True)
    take(arch.v_proj, k_rows, 0, bias=True)
    take(arch.o_proj, q_rows, 1, bias=False)
    take(arch.gate_proj, channels, 0, bias=True)
    take(arch.up_proj, channels, 0, bias=True)
    take(arch.down_proj, channels, 1, bias=False)
    if arch.q_norm is not None and arch.qk_norm == "channel":
        take(arch.q_norm, q_rows, 0, bias=False)
        take(arch.k_norm, k_rows, 0, bias=False)
    if o_proj is not None:
        key = f"{arch.o_proj}.weight"
        state[key] = _replacement(o_proj, "o_proj", state[key])
    if down_proj is not None:
        key = f"{arch.down_proj}.weight"
        state[key] = _replacement(down_proj, "down_proj", state[key])
    shape = BlockShape(len(groups) * have.group_size, len(groups), have.head_dim, len(channels))
    return build_block(block, arch, config, shape, layer_idx, state)


def prune_block(block: nn.Module, arch: Architecture, config, layer_idx: int, keep_groups, keep_channels,
                o_proj: Tensor | None = None, down_proj: Tensor | None = None) -> nn.Module:
    """Shrink ``block`` to exactly the width ``config`` declares (see ``select_block``), so the model stays
    a stock checkpoint: ``keep_groups`` must name as many KV groups, ``keep_channels`` as many channels."""
    have, want = arch.block_shape(block, config), arch.shape_of(config)
    if have.group_size != want.group_size or have.head_dim != want.head_dim:
        raise ValueError(f"block {have} cannot be pruned to {want}: GQA group size and head_dim must match")
    _selection(keep_groups, "keep_groups", want.num_kv_heads, have.num_kv_heads)
    _selection(keep_channels, "keep_channels", want.intermediate_size, have.intermediate_size)
    return select_block(block, arch, config, layer_idx, keep_groups, keep_channels, o_proj, down_proj)
