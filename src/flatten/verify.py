"""Checking that a registered ``Architecture`` describes its family, on a tiny random model of that family."""

from __future__ import annotations

import copy

import torch
from torch import nn

from flatten.calibration import capture, run_block
from flatten.merge import flatten_blocks, fold_norms, prune_block
from flatten.models.architectures import Architecture, architecture_for

TINY = {"num_heads": 4, "head_dim": 8, "intermediate_size": 24}


def verify_architecture(model_or_config, seed: int = 0) -> None:
    """Check the kernel's identities on a tiny random model built from ``model_or_config``'s config (its
    weights are not read): folding the norms leaves a block's function unchanged; a pair flattened with a
    silent partner (writers zeroed, q/k norms equal) computes the other block; pruning that back to the other
    block's heads and channels gives the block again. For a family whose blocks never flatten exactly
    (``Architecture.merge_refusal``), only the last: a pair pruned back to one block whole gives that block.
    A description that names the wrong parts, lays heads out otherwise, or declares the wrong norm form or
    place fails one of them. Raises a ValueError saying which; returns None."""
    config = getattr(model_or_config, "config", model_or_config)
    arch = architecture_for(config)
    model = _tiny_model(config, arch, seed)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (2, 7),
                        generator=torch.Generator().manual_seed(seed))
    inputs = capture(model, arch, [ids])
    hidden, calls = inputs.hidden, inputs.calls[0]
    first, second = arch.layers_of(model)[:2]
    tiny_config, shape = model.config, arch.shape_of(model.config)

    def fail(what: str) -> ValueError:
        return ValueError(f"architecture {arch.model_type!r} fails on a tiny random {type(model).__name__}: "
                          f"{what}; check its paths, config fields and norm form ({arch.norm!r})")

    def check(build, want: nn.Module, what: str) -> None:
        try:
            got = build()
        except (RuntimeError, ValueError, TypeError) as error:
            raise fail(f"{what} could not be built ({error})") from error
        got_out, want_out = run_block(got, hidden, calls, what)[0], run_block(want, hidden, calls, what)[0]
        # 1e-5: some families compute their norms in float32 even in a float64 model
        if not torch.allclose(got_out, want_out, rtol=1e-5, atol=1e-5 * float(want_out.abs().max())):
            raise fail(f"{what} does not compute what it should (largest difference "
                       f"{float((got_out - want_out).abs().max()):.3g})")

    for want, got, where in _placement(first, arch, hidden[:1], calls[:1]):
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())):
            raise fail(f"the {where} is not what the description's norms, before and after the sub-layers, make of "
                       f"the block's input (largest difference {float((got - want).abs().max()):.3g})")
    check(lambda: fold_norms(first, arch, tiny_config, 0), first, "the block with its norms folded")
    exact = arch.merge_refusal is None  # else a wide block refuses to compute; one block kept whole must be exact
    for keep, other, side in ((first, second, 0), (second, first, 1)):
        partner = _silenced(other, arch, keep) if exact else other
        pair = (keep, partner) if side == 0 else (partner, keep)
        if exact:
            check(lambda: flatten_blocks(*pair, arch, tiny_config, 0), keep,
                  f"the pair flattened with a silent {'second' if side == 0 else 'first'} block")
        groups = [g + side * shape.num_kv_heads for g in range(shape.num_kv_heads)]
        channels = [c + side * shape.intermediate_size for c in range(shape.intermediate_size)]
        check(lambda: prune_block(flatten_blocks(*pair, arch, tiny_config, 0), arch, tiny_config, 0, groups, channels),
              keep, "that pair pruned back to the other block's heads and channels" if exact else
              "the pair pruned back to one block's heads and channels")
    groups, channels = range(shape.num_kv_heads), range(shape.intermediate_size, 2 * shape.intermediate_size)
    check(lambda: prune_block(flatten_blocks(first, second, arch, tiny_config, 0), arch, tiny_config, 0, groups,
                              channels), _with_mlp_of(first, second, arch),
          "the pair pruned back to the first block's heads and the second block's MLP channels")


def _tiny_model(config, arch: Architecture, seed: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    tiny = copy.deepcopy(config)
    rotary = _rotary_pairs(config, arch.shape_of(config).head_dim)
    heads, kv_heads = TINY["num_heads"], getattr(config, arch.num_kv_heads_field, None)
    grouped = kv_heads is not None and kv_heads < getattr(config, arch.num_heads_field)
    for field, value in ((arch.num_heads_field, heads), (arch.num_kv_heads_field, heads // 2 if grouped else heads),
                         (arch.head_dim_field, TINY["head_dim"]),
                         (arch.intermediate_size_field, TINY["intermediate_size"]), (arch.num_layers_field, 2)):
        setattr(tiny, field, value)
    tiny.hidden_size = heads * TINY["head_dim"]
    if hasattr(tiny, "vocab_size"):
        tiny.vocab_size = 64
        for field in ("pad_token_id", "bos_token_id", "eos_token_id"):  # Phi-3's are ids of a 32k vocabulary
            if isinstance(getattr(tiny, field, None), int) and getattr(tiny, field) >= tiny.vocab_size:
                setattr(tiny, field, None)
    for field in arch.per_layer_fields:  # both blocks like the first: a block kept whole takes the first's entry
        if getattr(tiny, field, None) is not None:
            setattr(tiny, field, list(getattr(tiny, field))[:1] * 2)
    for field in arch.layer_count_fields:
        if getattr(tiny, field, None) is not None:
            setattr(tiny, field, min(getattr(tiny, field), 2))
    rope = getattr(tiny, "rope_parameters", None)
    if isinstance(rope, dict):  # per-frequency factors (Phi-3's longrope): one per rotated pair of the tiny head
        pairs = _rotary_pairs(tiny, TINY["head_dim"])
        tiny.rope_parameters = {key: value[:pairs] if isinstance(value, list) and len(value) == rotary else value
                                for key, value in rope.items()}
    tiny._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny).to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # far from 1 (and from 0), so that a wrong fold shows
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=generator) * torch.sign(
                    torch.randn(p.shape, generator=generator, dtype=p.dtype)))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) / p.shape[-1] ** 0.5)
    return model


def _rotary_pairs(config, head_dim: int) -> int:
    """How many pairs of dimensions RoPE rotates in a head of ``head_dim``."""
    rope = getattr(config, "rope_parameters", None) or {}
    return int(head_dim * rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))) // 2


@torch.no_grad()
def _placement(block: nn.Module, arch: Architecture, hidden: list, calls: list) -> list[tuple]:
    """``(what the description says, what the block computes, name)`` for the attention's input, the MLP's
    input and the block's output, the sub-layers' outputs taken from a forward pass of the block."""
    seen = {}

    def record(name):
        def hook(module, args, kwargs, out):
            seen[name] = (args[0] if args else kwargs["hidden_states"], out[0] if isinstance(out, tuple) else out)
        return hook

    sublayers = {"attention": arch.o_proj, "MLP": arch.down_proj}
    handles = [block.get_submodule(path.rsplit(".", 1)[0]).register_forward_hook(record(name), with_kwargs=True)
               for name, path in sublayers.items()]
    try:
        y = run_block(block, hidden, calls, "block")[0]
    finally:
        for handle in handles:
            handle.remove()
    (a_in, a_out), (m_in, m_out), x = seen["attention"], seen["MLP"], hidden[0]

    def norm(path, z):
        return z if path is None else block.get_submodule(path)(z)

    u = x + norm(arch.attn_post_norm, a_out)
    return [(norm(arch.attn_norm, x), a_in, "attention's input"), (norm(arch.mlp_norm, u), m_in, "MLP's input"),
            (u + norm(arch.mlp_post_norm, m_out), y, "block's output")]


def _with_mlp_of(block: nn.Module, other: nn.Module, arch: Architecture) -> nn.Module:
    """A copy of ``block`` with ``other``'s MLP and the norms around it."""
    mixed = copy.deepcopy(block)
    with torch.no_grad():
        for path in (arch.mlp_norm, arch.mlp_post_norm) + arch.projections.modules(arch.mlp_readers + (arch.down_proj,)):
            if path is not None:
                for name, tensor in mixed.get_submodule(path).named_parameters():
                    tensor.copy_(other.get_submodule(path).get_parameter(name))
    return mixed


def _silenced(block: nn.Module, arch: Architecture, partner: nn.Module) -> nn.Module:
    """A copy of ``block`` that adds nothing to the residual stream (its writers zeroed), with ``partner``'s
    q/k norms (a pair flattens exactly only where they are equal)."""
    silent = copy.deepcopy(block)
    with torch.no_grad():
        for path in arch.writers:
            writer = silent.get_submodule(path)
            writer.weight.zero_()
            if getattr(writer, "bias", None) is not None:
                writer.bias.zero_()
        for path in (arch.q_norm, arch.k_norm) if arch.q_norm is not None else ():
            silent.get_submodule(path).weight.copy_(partner.get_submodule(path).weight)
    return silent
