"""The flattening identity (docs/method.md section 2) and the pruning kernel, over tiny random models."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatten import ARCHITECTURES, BlockPair, BlockRun, architecture_for, flatten_blocks, fold_norms, prune_block
from tiny import BlockRunner, mergeable, random_hidden, tiny_model, tiny_specs, tolerance

SETTINGS = settings(max_examples=40, deadline=None)


def side_by_side(run, blocks, x):
    """The right-hand side of the flattening identity (docs/method.md section 2) for pre-norm blocks."""
    u = x
    for block in blocks:
        u = u + run.attention(block, block.input_layernorm(x))
    y = u
    for block in blocks:
        y = y + block.mlp(block.post_attention_layernorm(u))
    return y


# OLMo 2's merges are refused (its norms after the sub-layers and over all heads' q and k: merge_refusal),
# Qwen3's exact only where two blocks' q/k norms are equal (tiny_model makes them so): tests/test_families.py
@pytest.mark.parametrize("model_type", mergeable())
@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(1, 9), data=st.data())
def test_wide_block_computes_both_blocks_side_by_side(model_type, batch, length, data):
    spec = data.draw(tiny_specs([model_type]), label="spec")
    model = tiny_model(spec)
    index = data.draw(st.integers(0, spec.num_layers - 2), label="pair index")
    first, second = model.model.layers[index], model.model.layers[index + 1]
    wide = BlockPair(model, index).flatten()

    x = random_hidden(spec, batch, length)
    run = BlockRunner(model, x)
    with torch.no_grad():
        y = side_by_side(run, [first, second], x)
        got = run.block(wide, x)
    assert type(wide) is type(first)
    torch.testing.assert_close(got, y, **tolerance(spec.dtype))


@pytest.mark.parametrize("model_type", mergeable())
@settings(max_examples=15, deadline=None)
@given(length=st.integers(1, 7), data=st.data())
def test_a_run_of_blocks_flattens_into_all_of_them_side_by_side(model_type, length, data):
    spec = data.draw(tiny_specs([model_type], num_layers=st.integers(3, 5)), label="spec")
    model = tiny_model(spec)
    count = data.draw(st.integers(2, spec.num_layers), label="blocks")
    index = data.draw(st.integers(0, spec.num_layers - count), label="first block")
    blocks = list(model.model.layers[index : index + count])
    wide = BlockRun(model, index, count).flatten()

    x = random_hidden(spec, 2, length)
    run = BlockRunner(model, x)
    with torch.no_grad():
        torch.testing.assert_close(run.block(wide, x), side_by_side(run, blocks, x), **tolerance(spec.dtype))
    shape = architecture_for(model).block_shape(wide, model.config)
    assert (shape.num_kv_heads, shape.intermediate_size) == (count * spec.num_kv_heads, count * spec.intermediate_size)


@SETTINGS
@given(spec=tiny_specs(ARCHITECTURES.names()), length=st.integers(1, 9))
def test_folding_norms_leaves_a_block_unchanged(spec, length):
    model = tiny_model(spec)
    arch = architecture_for(model)
    block = model.model.layers[0]
    folded = fold_norms(block, arch, model.config, 0)
    x = random_hidden(spec, 2, length)
    run = BlockRunner(model, x)
    with torch.no_grad():
        torch.testing.assert_close(run.block(folded, x), run.block(block, x), **tolerance(spec.dtype, spec.model_type))
    for norm, _ in arch.pre_norms:  # a factor of 1: weight 1, or 0 for a (1 + weight) norm
        assert torch.equal(folded.get_submodule(norm).weight,
                           arch.norm_weight(torch.ones_like(block.get_submodule(norm).weight)))
    for norm in set(arch.norms) - {norm for norm, _ in arch.pre_norms}:  # after a sub-layer, on q/k: kept
        assert torch.equal(folded.get_submodule(norm).weight, block.get_submodule(norm).weight)


@SETTINGS
@given(spec=tiny_specs(ARCHITECTURES.names()), length=st.integers(1, 9), same_qk_norms=st.booleans())
def test_flattening_with_a_silent_block_then_keeping_the_first_gives_the_first_back(spec, length, same_qk_norms):
    spec = replace(spec, same_qk_norms=same_qk_norms)
    model = tiny_model(spec)
    first, second = model.model.layers[0], model.model.layers[1]
    with torch.no_grad():
        for writer in (second.self_attn.o_proj, second.mlp.down_proj):
            writer.weight.zero_()
            if writer.bias is not None:
                writer.bias.zero_()
    pair = BlockPair(model, 0)
    small = pair.prune(pair.flatten(), keep_groups=range(spec.num_kv_heads),
                       keep_channels=range(spec.intermediate_size))
    x = random_hidden(spec, 2, length)
    run = BlockRunner(model, x)
    with torch.no_grad():
        torch.testing.assert_close(run.block(small, x), run.block(first, x), **tolerance(spec.dtype, spec.model_type))


def _snapshot(module, arch=None):
    """The module's tensors by name; with ``arch``, a block's, fused projections split into their virtual ones."""
    state = {name: t.detach().clone() for name, t in module.state_dict().items()}
    return state if arch is None else arch.projections.split(state)


def _folded(block, reader, norm, arch):
    weight = arch.projections.of(block, reader)[0].detach()
    return weight if norm is None else weight * arch.norm_scale(block.get_submodule(norm).weight.detach())


@SETTINGS
@given(spec=tiny_specs(ARCHITECTURES.names()), same_qk_norms=st.booleans())
def test_flatten_builds_exactly_the_concatenated_weights_and_touches_nothing_else(spec, same_qk_norms):
    model = tiny_model(replace(spec, same_qk_norms=same_qk_norms))
    arch = architecture_for(model)
    before = _snapshot(model)
    first, second = model.model.layers[0], model.model.layers[1]
    wide = BlockPair(model, first, second).flatten()

    after = _snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    expected = {}
    for norm, readers in ((arch.attn_norm, ("q_proj", "k_proj", "v_proj")), (arch.mlp_norm, ("gate_proj", "up_proj"))):
        if norm is not None:
            expected[f"{norm}.weight"] = arch.norm_weight(torch.ones(spec.hidden_size, dtype=spec.dtype))
        for name in readers:
            path = f"{'mlp' if name in ('gate_proj', 'up_proj') else 'self_attn'}.{name}"
            expected[f"{path}.weight"] = torch.cat([_folded(first, path, norm, arch), _folded(second, path, norm, arch)])
            if arch.projections.of(first, path)[1] is not None:
                expected[f"{path}.bias"] = torch.cat([arch.projections.of(block, path)[1] for block in (first, second)])
    for path in ("self_attn.o_proj", "mlp.down_proj"):
        expected[f"{path}.weight"] = torch.cat([first.get_submodule(path).weight, second.get_submodule(path).weight], 1)
        if first.get_submodule(path).bias is not None:
            expected[f"{path}.bias"] = first.get_submodule(path).bias + second.get_submodule(path).bias
    for norm in (arch.q_norm, arch.k_norm, arch.attn_post_norm, arch.mlp_post_norm):  # the first block's, or both
        if norm is not None:
            pair = [first.get_submodule(norm).weight, second.get_submodule(norm).weight]
            both = norm in (arch.q_norm, arch.k_norm) and arch.qk_norm == "channel"
            expected[f"{norm}.weight"] = torch.cat(pair) if both else pair[0]
    exact = arch.merge_refusal is None and (same_qk_norms or arch.q_norm is None)
    assert (getattr(wide, "flatten_inexact", None) is None) == exact
    got = _snapshot(wide, arch)
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key].detach(), rtol=1e-6, atol=0, msg=key)


@SETTINGS
@given(spec=tiny_specs(), data=st.data(), compensate=st.booleans())
def test_prune_keeps_exactly_the_selected_rows_and_columns(spec, data, compensate):
    model = tiny_model(spec)
    arch = architecture_for(model)
    wide = BlockPair(model, 0).flatten()
    wide_before = _snapshot(wide, arch)
    groups = data.draw(st.permutations(range(2 * spec.num_kv_heads)))[: spec.num_kv_heads]
    channels = data.draw(st.permutations(range(2 * spec.intermediate_size)))[: spec.intermediate_size]
    G, hd = spec.group_size, spec.head_dim
    o_new = torch.randn(spec.hidden_size, spec.num_kv_heads * G * hd, dtype=spec.dtype) if compensate else None
    down_new = torch.randn(spec.hidden_size, spec.intermediate_size, dtype=spec.dtype) if compensate else None
    small = prune_block(wide, arch, model.config, 0, groups, channels, o_proj=o_new, down_proj=down_new)

    assert all(torch.equal(wide_before[k], t) for k, t in _snapshot(wide, arch).items())
    g, c = sorted(groups), sorted(channels)
    q_rows = [(k * G + h) * hd + d for k in g for h in range(G) for d in range(hd)]
    kv_rows = [k * hd + d for k in g for d in range(hd)]
    rows = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows,
            "mlp.gate_proj": c, "mlp.up_proj": c}
    got = _snapshot(small, arch)
    for key, t in got.items():
        path, kind = key.rsplit(".", 1)
        w = wide_before[key]
        if path in rows:
            want = w[rows[path]]
        elif path == "self_attn.o_proj" and kind == "weight":
            want = o_new if compensate else w[:, q_rows]
        elif path == "mlp.down_proj" and kind == "weight":
            want = down_new if compensate else w[:, c]
        else:
            want = w
        assert torch.equal(t, want), key
    assert arch.block_shape(small, model.config) == arch.shape_of(model.config)


@settings(max_examples=20, deadline=None)
@given(spec=tiny_specs(num_layers=st.integers(3, 5)), length=st.integers(1, 6))
def test_a_pruned_block_flattens_again_exactly(spec, length):
    """Spans of 3+ blocks arise by flattening a flattened-and-pruned block with its next neighbour."""
    model = tiny_model(spec)
    pair = BlockPair(model, 0)
    pair.replace(pair.prune(pair.flatten(), range(spec.num_kv_heads), range(spec.intermediate_size)))
    first, second = model.model.layers[0], model.model.layers[1]
    wide = flatten_blocks(first, second, architecture_for(model), model.config, 0)
    x = random_hidden(spec, 1, length)
    run = BlockRunner(model, x)
    with torch.no_grad():
        torch.testing.assert_close(run.block(wide, x), side_by_side(run, [first, second], x), **tolerance(spec.dtype))
