"""Checking that a registered ``Architecture`` describes its family, on a tiny random model of that family."""

from __future__ import annotations

import copy

import torch
from torch import nn

from flatten.architectures import Architecture, architecture_for
from flatten.calibration import capture, run_block
from flatten.merge import flatten_blocks, fold_norms, prune_block

TINY = {"num_heads": 4, "head_dim": 8, "intermediate_size": 24}


def verify_architecture(model_or_config, seed: int = 0) -> None:
    """Check the kernel's identities on a tiny random model built from ``model_or_config``'s config (its
    weights are not read): folding the norms leaves a block's function unchanged; a pair flattened with a
    silent partner (writers zeroed) computes the other block; pruning that back to the other block's heads
    and channels gives the block again. A description that names the wrong parts, lays heads out otherwise,
    or declares the wrong norm form fails one of them. Raises a ValueError saying which; returns None."""
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

    check(lambda: fold_norms(first, arch, tiny_config, 0), first, "the block with its norms folded")
    for keep, other, side in ((first, second, 0), (second, first, 1)):
        pair = (keep, _silenced(other, arch)) if side == 0 else (_silenced(other, arch), keep)
        check(lambda: flatten_blocks(*pair, arch, tiny_config, 0), keep,
              f"the pair flattened with a silent {'second' if side == 0 else 'first'} block")
        groups = [g + side * shape.num_kv_heads for g in range(shape.num_kv_heads)]
        channels = [c + side * shape.intermediate_size for c in range(shape.intermediate_size)]
        check(lambda: prune_block(flatten_blocks(*pair, arch, tiny_config, 0), arch, tiny_config, 0, groups, channels),
              keep, "that pair pruned back to the other block's heads and channels")


def _tiny_model(config, arch: Architecture, seed: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    tiny = copy.deepcopy(config)
    heads, kv_heads = TINY["num_heads"], getattr(config, arch.num_kv_heads_field, None)
    grouped = kv_heads is not None and kv_heads < getattr(config, arch.num_heads_field)
    for field, value in ((arch.num_heads_field, heads), (arch.num_kv_heads_field, heads // 2 if grouped else heads),
                         (arch.head_dim_field, TINY["head_dim"]),
                         (arch.intermediate_size_field, TINY["intermediate_size"]), (arch.num_layers_field, 2)):
        setattr(tiny, field, value)
    tiny.hidden_size = heads * TINY["head_dim"]
    if hasattr(tiny, "vocab_size"):
        tiny.vocab_size = 64
    for field in arch.per_layer_fields:
        if getattr(tiny, field, None) is not None:
            setattr(tiny, field, list(getattr(tiny, field))[:2])
    for field in arch.layer_count_fields:
        if getattr(tiny, field, None) is not None:
            setattr(tiny, field, min(getattr(tiny, field), 2))
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


def _silenced(block: nn.Module, arch: Architecture) -> nn.Module:
    """A copy of ``block`` that adds nothing to the residual stream (its writers zeroed)."""
    silent = copy.deepcopy(block)
    with torch.no_grad():
        for path in arch.writers:
            writer = silent.get_submodule(path)
            writer.weight.zero_()
            if getattr(writer, "bias", None) is not None:
                writer.bias.zero_()
    return silent
