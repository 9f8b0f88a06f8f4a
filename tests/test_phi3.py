"""Phi-3 as a registered family, on tiny random models built from ``Phi3Config``: its fused ``qkv_proj`` (rows:
all queries, then all keys, then all values) and ``gate_up_proj`` (gate, then up) are stated as data
(``Architecture.fused``); the kernel, calibration and scorers see the virtual q/k/v/gate/up projections, and
every block built holds the fused weights again, so every strategy saves a stock Phi-3 checkpoint. Phi-3 is
LLaMA-like with pre-norms only, so its merges are exact (property test)."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import (CALIBRATION, STRATEGY_OPTIONS, BlockRunner, TinySpec, greedy, random_hidden, tiny_model, tiny_specs,
                  tolerance)
from transformers import AutoConfig, AutoModelForCausalLM

from flatten import (
    ARCHITECTURES,
    STRATEGIES,
    Architecture,
    BlockPair,
    architecture_for,
    get_strategy,
    save_checkpoint,
    verify_architecture,
)
from flatten.calibration import attention_stats, capture, mlp_stats
from flatten.merge import prune_block, select_block


def longrope(head_dim: int, partial: float = 0.5) -> dict:
    """Phi-3's long-context RoPE (short and long factors per rotated pair), a partial rotary factor and a
    sliding window shorter than the test sequences, as config overrides of a tiny model."""
    pairs = int(head_dim * partial) // 2
    factors = {"short_factor": [1.0 + 0.1 * i for i in range(pairs)], "long_factor": [2.0 + i for i in range(pairs)]}
    return {"rope_scaling": {"rope_type": "longrope", **factors}, "partial_rotary_factor": partial,
            "original_max_position_embeddings": 32, "sliding_window": 5}


# GQA; head_dim = hidden / heads (Phi3Config derives it so: its longrope factors are counted from it)
FAMILIES = {
    "phi3": (TinySpec("phi3", 4, 2, 2, 4, 20, num_layers=6), {}),
    "phi3-longrope": (TinySpec("phi3", 8, 2, 2, 8, 20, num_layers=6), longrope(8)),
}


def _model(family: str):
    spec, overrides = FAMILIES[family]
    return tiny_model(spec, **overrides)


def test_the_fusion_is_stated_as_data():
    arch = ARCHITECTURES.get("phi3")
    assert arch.projections.fused == {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                            "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
    assert arch.merge_refusal is None  # pre-norms only: merges are exact
    model = _model("phi3-longrope")
    assert model.config.rope_parameters["rope_type"] == "longrope" and model.config.sliding_window == 5


@pytest.mark.parametrize("family", FAMILIES)
def test_phi3_verifies(family):
    verify_architecture(_model(family))


def test_a_real_phi3_config_verifies():
    """``verify_architecture`` on the full-size configs (weights never read): Phi-3-mini's and a long-context one's
    (longrope factors for 96-dim heads, a sliding window), shrunk to a tiny model."""
    verify_architecture(AutoConfig.for_model("phi3"))
    verify_architecture(AutoConfig.for_model("phi3", max_position_embeddings=131072, sliding_window=262143,
                                             original_max_position_embeddings=4096,
                                             rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 48,
                                                           "long_factor": [1.5] * 48}))


def test_virtual_projections_are_the_rows_of_the_fused_weights():
    spec, _ = FAMILIES["phi3"]
    model = _model("phi3")
    arch, block = architecture_for(model), model.model.layers[1]
    q, k, v = (arch.projections.of(block, path)[0] for path in (arch.q_proj, arch.k_proj, arch.v_proj))
    assert (q.shape[0], k.shape[0], v.shape[0]) == (spec.num_heads * spec.head_dim,) + (spec.num_kv_heads * spec.head_dim,) * 2
    assert torch.equal(torch.cat([q, k, v]), block.self_attn.qkv_proj.weight)
    gate, up = (arch.projections.of(block, path)[0] for path in (arch.gate_proj, arch.up_proj))
    assert torch.equal(torch.cat([gate, up]), block.mlp.gate_up_proj.weight) and gate.shape[0] == spec.intermediate_size
    z = random_hidden(spec, 1, 3)
    with torch.no_grad():  # Phi3MLP computes up * act(gate) with exactly these halves
        torch.testing.assert_close(block.mlp(z), block.mlp.down_proj(torch.nn.functional.silu(z @ gate.T) * (z @ up.T)))
    assert arch.block_shape(block, model.config) == arch.shape_of(model.config)


def test_calibration_statistics_see_the_virtual_projections():
    spec, _ = FAMILIES["phi3"]
    model = _model("phi3")
    arch = architecture_for(model)
    wide = BlockPair(model, 0).flatten()
    shape = arch.block_shape(wide, model.config)
    assert (shape.num_kv_heads, shape.intermediate_size) == (2 * spec.num_kv_heads, 2 * spec.intermediate_size)
    inputs = capture(model, arch, list(CALIBRATION.split(4)))
    stats = attention_stats(wide, arch, shape, inputs.hidden, inputs.calls[0])
    assert torch.equal(torch.cat([stats.weights[key] for key in "qkv"]), wide.self_attn.qkv_proj.weight)
    mlp = mlp_stats(wide, arch, shape, inputs.hidden, inputs.calls[0], targets=None)
    assert torch.equal(torch.cat([mlp.weights["gate"], mlp.weights["up"]]), wide.mlp.gate_up_proj.weight)
    assert mlp.gram.shape == (2 * spec.intermediate_size,) * 2


def _side_by_side(run, first, second, x):
    """``u = x + A1(N1 x) + A2(N2 x)``, ``y = u + M1(N1' u) + M2(N2' u)``: two pre-norm blocks side by side."""
    u = x + run.attention(first, first.input_layernorm(x)) + run.attention(second, second.input_layernorm(x))
    return u + first.mlp(first.post_attention_layernorm(u)) + second.mlp(second.post_attention_layernorm(u))


@settings(max_examples=30, deadline=None)
@given(spec=tiny_specs(["phi3"], num_layers=st.integers(2, 4)), long_context=st.booleans(), batch=st.integers(1, 3),
       length=st.integers(1, 9), data=st.data())
def test_two_phi3_blocks_flatten_into_both_side_by_side(spec, long_context, batch, length, data):
    """The flattening identity on Phi-3, with and without longrope, partial rotary and a sliding window (drawn
    head_dim 4 or 8 for longrope: its factors count rotated pairs of hidden / heads); the wide block is a stock
    Phi3DecoderLayer holding fused weights of double width."""
    overrides = {}
    if long_context:
        spec = replace(spec, head_dim=max(spec.head_dim, 4), hidden_multiple=max(spec.head_dim, 4))
        overrides = longrope(spec.head_dim)
    model = tiny_model(spec, **overrides)
    index = data.draw(st.integers(0, spec.num_layers - 2), label="pair index")
    first, second = model.model.layers[index], model.model.layers[index + 1]
    wide = BlockPair(model, index).flatten()
    assert type(wide) is type(first) and not hasattr(wide.self_attn, "q_proj")
    width = 2 * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    assert tuple(wide.self_attn.qkv_proj.weight.shape) == (width, spec.hidden_size)
    assert tuple(wide.mlp.gate_up_proj.weight.shape) == (4 * spec.intermediate_size, spec.hidden_size)
    x = random_hidden(spec, batch, length)
    run = BlockRunner(model, x)
    with torch.no_grad():
        torch.testing.assert_close(run.block(wide, x), _side_by_side(run, first, second, x), **tolerance(spec.dtype))


def test_pruning_a_wide_phi3_block_keeps_the_rows_it_names():
    """Keeping KV groups [0, 2] and every other channel: the fused weights of the result are exactly those rows
    of the wide block's (queries, keys, values; gates, ups), stacked back in Phi-3's order."""
    spec, _ = FAMILIES["phi3"]
    model = _model("phi3")
    arch, config = architecture_for(model), model.config
    wide = BlockPair(model, 2).flatten()
    channels = torch.arange(0, 2 * spec.intermediate_size, 2)
    kept = prune_block(wide, arch, config, 2, [0, 2], channels)
    shape = arch.block_shape(wide, config)
    groups = torch.tensor([0, 2])
    q, k, v = (arch.projections.of(wide, path)[0] for path in (arch.q_proj, arch.k_proj, arch.v_proj))
    want = torch.cat([q[shape.head_rows(groups)], k[shape.kv_rows(groups)], v[shape.kv_rows(groups)]])
    assert torch.equal(kept.self_attn.qkv_proj.weight, want)
    gate, up = (arch.projections.of(wide, path)[0] for path in (arch.gate_proj, arch.up_proj))
    assert torch.equal(kept.mlp.gate_up_proj.weight, torch.cat([gate[channels], up[channels]]))
    assert arch.block_shape(kept, config) == arch.shape_of(config)

    x = random_hidden(spec, 2, 6)  # one block whole (block 3): that block exactly, norms folded
    run = BlockRunner(model, x)
    whole = select_block(wide, arch, config, 2, range(spec.num_kv_heads, 2 * spec.num_kv_heads),
                         range(spec.intermediate_size, 2 * spec.intermediate_size))
    with torch.no_grad():
        torch.testing.assert_close(run.block(whole, x), run.block(model.model.layers[3], x), **tolerance(spec.dtype))


@pytest.mark.parametrize("strategy", STRATEGIES.names())
@pytest.mark.parametrize("family", FAMILIES)
def test_every_strategy_compresses_phi3_into_a_stock_checkpoint(family, strategy, tmp_path):
    spec, _ = FAMILIES[family]
    model = _model(family)
    compressed, record = get_strategy(strategy)(model, CALIBRATION, progress=False,
                                                **STRATEGY_OPTIONS.get(strategy, {})).compress(remove=2)
    assert compressed is model and record.method
    layers = model.model.layers
    assert len(layers) == model.config.num_hidden_layers <= spec.num_layers - (strategy not in ("blockpruner", "prune-only"))
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(layers)))

    save_checkpoint(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=spec.dtype, attn_implementation="eager").eval()
    assert type(reloaded) is type(model) and reloaded.config.num_hidden_layers == len(layers)
    names = set(reloaded.state_dict())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(name.endswith(("q_proj.weight", "gate_proj.weight")) for name in names)
    if family == "phi3-longrope":
        assert reloaded.config.rope_parameters["rope_type"] == "longrope" and reloaded.config.sliding_window == 5
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-10, atol=1e-10)
    assert torch.equal(greedy(reloaded, ids, True), greedy(reloaded, ids, False))
    assert torch.equal(greedy(model, ids, True), greedy(reloaded, ids, True))


@pytest.mark.parametrize("fused, refused", [
    ((("self_attn.qkv_proj", ("q_proj", "k_proj", "o_proj")),),
     r"fuses 'o_proj' into 'self_attn.qkv_proj'; the kernel splits only projections that read a norm"),
    ((("self_attn.qkv_proj", ("q_proj", "gate_proj")),), r"attention and MLP projections read different norms"),
    ((("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")), ("self_attn.kv", ("k_proj", "v_proj"))),
     r"fuses k_proj twice, into 'self_attn.qkv_proj' and 'self_attn.kv'"),
    ((("self_attn.qkv_proj", ("q_proj",)),), r"each is \(path of the fused weight, \(two or more of"),
    ((("mlp.down_proj", ("gate_proj", "up_proj")),), r"names 'mlp.down_proj' twice, as down_proj and as a fused"),
])
def test_a_fusion_the_kernel_cannot_honour_is_refused_at_registration(fused, refused):
    with pytest.raises(ValueError, match=refused):
        Architecture("somefamily", fused=fused)


def test_phi3_described_without_its_fusions_is_caught():
    phi3 = ARCHITECTURES.get("phi3")
    with pytest.raises(ValueError, match=r"Phi3DecoderLayer has no 'self_attn.q_proj'.*fused"):
        replace(phi3, fused=()).check_block(_model("phi3").model.layers[0])
