"""Qwen3, OLMo 2 and Llama 3 (a LLaMA config with llama3 RoPE scaling) as registered families, on tiny random
models built from their transformers configs: every strategy compresses one into a stock checkpoint or is
refused with its reason; merges are exact where the math allows and refused where it does not."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from flatten import (STRATEGIES, BlockPair, architecture_for, fold_norms, get_strategy, save_checkpoint,
                     verify_architecture)
from flatten.merge import prune_block, select_block
from flatten.models.exactness import DROPS, MERGES, REFITS
from tiny import (CALIBRATION, STRATEGY_OPTIONS, BlockRunner, TinySpec, assert_same_block, greedy, random_hidden,
                  tiny_model, tolerance)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
# GQA everywhere; Qwen3's head_dim (4) is not hidden / heads (12 / 4); its blocks' q/k norms differ, as trained ones do
FAMILIES = {
    "qwen3": (TinySpec("qwen3", 3, 2, 2, 4, 20, num_layers=6, same_qk_norms=False), {}),
    "olmo2": (TinySpec("olmo2", 2, 2, 2, 4, 20, num_layers=6), {}),
    "llama3": (TinySpec("llama", 2, 2, 2, 4, 20, num_layers=6), {"rope_scaling": LLAMA3_ROPE}),
}
QWEN3_MERGE = r"their self_attn.q_norm and self_attn.k_norm weights differ, and a wide block has one of each"
OLMO2_MERGE = (r"post_attention_layernorm normalises the attention's output after o_proj.*self_attn.q_norm and "
               r"self_attn.k_norm take the RMS over all heads' queries \(keys\) together")
OLMO2_RUNS = (r"Strategies that run on 'olmo2': shortgpt, sleb, angular, blockpruner, laco, cut-absorb \(approximate "
              r"refit\), replaceme \(approximate refit\), prune-only \(approximate refit\)$")
REFUSED = {  # strategy -> what its refusal says
    "qwen3": {name: QWEN3_MERGE for name in MERGES},
    "olmo2": {name: OLMO2_MERGE for name in MERGES},  # its refits run approximately (tests/test_gemma3.py)
    "llama3": {},
}


def _model(family: str):
    spec, overrides = FAMILIES[family]
    return tiny_model(spec, **overrides)


def test_every_registered_strategy_is_known_to_the_refusals():
    assert set(DROPS + REFITS + MERGES) <= set(STRATEGIES.names())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_verifies(family):
    model = _model(family)
    verify_architecture(model)
    assert architecture_for(model).model_type == FAMILIES[family][0].model_type


@pytest.mark.parametrize("strategy", STRATEGIES.names())
@pytest.mark.parametrize("family", FAMILIES)
def test_a_strategy_compresses_into_a_stock_checkpoint_or_says_why_not(family, strategy, tmp_path):
    spec, _ = FAMILIES[family]
    model = _model(family)
    compressor = get_strategy(strategy)
    if strategy in REFUSED[family]:
        with pytest.raises(ValueError, match=REFUSED[family][strategy]) as refusal:
            compressor(model, CALIBRATION, progress=False, **STRATEGY_OPTIONS.get(strategy, {})).compress(remove=2)
        assert "Strategies that run on" in str(refusal.value)
        if family == "olmo2":
            assert refusal.match(OLMO2_RUNS)
        return
    options = STRATEGY_OPTIONS.get(strategy, {})
    compressed, record = compressor(model, CALIBRATION, progress=False, **options).compress(remove=2)
    assert compressed is model and record.method
    layers = model.model.layers
    assert len(layers) == model.config.num_hidden_layers <= spec.num_layers - (strategy not in ("blockpruner", "prune-only"))
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(layers)))

    save_checkpoint(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=spec.dtype, attn_implementation="eager").eval()
    assert type(reloaded) is type(model) and reloaded.config.num_hidden_layers == len(layers)
    if family == "llama3":
        assert reloaded.config.rope_parameters["rope_type"] == "llama3" and not reloaded.config.tie_word_embeddings
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-10, atol=1e-10)
    assert torch.equal(greedy(reloaded, ids, True), greedy(reloaded, ids, False))
    assert torch.equal(greedy(model, ids, True), greedy(reloaded, ids, True))


def _with_mlp_of(block, other, arch):
    """``block`` with ``other``'s MLP and the norms around it."""
    mixed = copy.deepcopy(block)
    for path in ("mlp", arch.mlp_norm, arch.mlp_post_norm):
        if path is not None:
            mixed.set_submodule(path, copy.deepcopy(other.get_submodule(path)))
    return mixed


def _folded(block, arch, config):
    return fold_norms(block, arch, config, block.self_attn.layer_idx)


@pytest.mark.parametrize("family", ["qwen3", "olmo2"])
def test_keeping_one_block_whole_from_a_wide_block_gives_that_block_exactly(family):
    """An absorb keeps block 1's heads and channels (then refits down_proj), a drop either block's, both as they
    were: their q/k norms and the norms after the sub-layers included, where the wide block holds only one."""
    model = _model(family)
    spec, arch, config = FAMILIES[family][0], architecture_for(model), model.config
    first, second = model.model.layers[2], model.model.layers[3]
    wide = BlockPair(model, 2).flatten()
    g, f = spec.num_kv_heads, spec.intermediate_size
    x = random_hidden(spec, 2, 6)
    run = BlockRunner(model, x)
    with torch.no_grad():
        for groups, channels, want in ((range(g), range(f), first), (range(g, 2 * g), range(f, 2 * f), second),
                                       (range(g), range(f, 2 * f), _with_mlp_of(first, second, arch))):
            kept = prune_block(wide, arch, config, 2, groups, channels)
            assert_same_block(kept, _folded(want, arch, config))
            torch.testing.assert_close(run.block(kept, x), run.block(want, x), **tolerance(spec.dtype))
    if family == "qwen3":  # no norm after down_proj: the absorb's refit stands
        down = torch.randn(spec.hidden_size, f, dtype=spec.dtype)
        absorbed = prune_block(wide, arch, config, 2, range(g), range(f), down_proj=down)
        assert_same_block(absorbed, _folded(first, arch, config), but=["mlp.down_proj.weight"])
        assert torch.equal(absorbed.mlp.down_proj.weight, down)


def _side_by_side(run, first, second, x):
    """``u = x + A1(N1 x) + A2(N2 x)``, ``y = u + M1(N1' u) + M2(N2' u)``: two pre-norm blocks side by side."""
    u = x + run.attention(first, first.input_layernorm(x)) + run.attention(second, second.input_layernorm(x))
    return u + first.mlp(first.post_attention_layernorm(u)) + second.mlp(second.post_attention_layernorm(u))


def test_qwen3_blocks_with_equal_qk_norms_flatten_exactly_and_with_unequal_ones_are_refused():
    spec, _ = FAMILIES["qwen3"]
    model = _model("qwen3")
    arch = architecture_for(model)
    first, second = model.model.layers[0], model.model.layers[1]
    x = random_hidden(spec, 2, 6)
    run = BlockRunner(model, x)
    wide = BlockPair(model, 0).flatten()
    with pytest.raises(ValueError, match=f"a merge .* is refused on 'qwen3': .*{QWEN3_MERGE}"):
        run.block(wide, x)
    with pytest.raises(ValueError, match=f"a merge keeping KV groups of several blocks or refitting o_proj .*{QWEN3_MERGE}"):
        prune_block(wide, arch, model.config, 0, [0, 2], range(spec.intermediate_size))
    with pytest.raises(ValueError, match="refitting o_proj"):
        prune_block(wide, arch, model.config, 0, range(spec.num_kv_heads), range(spec.intermediate_size),
                    o_proj=torch.zeros(spec.hidden_size, spec.num_heads * spec.head_dim, dtype=spec.dtype))

    with torch.no_grad():
        for path in (arch.q_norm, arch.k_norm):
            second.get_submodule(path).weight.copy_(first.get_submodule(path).weight)
        wide = BlockPair(model, 0).flatten()
        torch.testing.assert_close(run.block(wide, x), _side_by_side(run, first, second, x), **tolerance(spec.dtype))
    mixed = prune_block(wide, arch, model.config, 0, [0, 2], range(0, 2 * spec.intermediate_size, 2))
    assert torch.equal(mixed.self_attn.q_norm.weight, first.self_attn.q_norm.weight)


def test_llama3_blocks_flatten_exactly():
    spec, _ = FAMILIES["llama3"]
    model = _model("llama3")
    first, second = model.model.layers[3], model.model.layers[4]
    x = random_hidden(spec, 2, 9)
    run = BlockRunner(model, x)
    with torch.no_grad():
        torch.testing.assert_close(run.block(BlockPair(model, 3).flatten(), x), _side_by_side(run, first, second, x),
                                   **tolerance(spec.dtype))


def test_olmo2_blocks_do_not_flatten_exactly_and_a_merge_is_refused():
    """OLMo 2: u = x + P_a(A(x)), y = u + P_m(M(u)), no norm before either sub-layer, and its q/k norms take one
    RMS over all heads. Two blocks side by side would compute P(A1 + A2), not P1(A1) + P2(A2), with an RMS over
    both blocks' heads: the wide block measurably misses the sum of the two, so it refuses to compute."""
    spec, _ = FAMILIES["olmo2"]
    model = _model("olmo2")
    arch = architecture_for(model)
    first, second = model.model.layers[0], model.model.layers[1]
    x = random_hidden(spec, 2, 6)
    run = BlockRunner(model, x)
    wide = BlockPair(model, 0).flatten()
    with pytest.raises(ValueError, match=f"a merge .* is refused on 'olmo2': .*{OLMO2_MERGE}.*{OLMO2_RUNS}"):
        run.block(wide, x)
    with torch.no_grad():
        u = x + first.post_attention_layernorm(run.attention(first, x)) + \
            second.post_attention_layernorm(run.attention(second, x))
        y = u + first.post_feedforward_layernorm(first.mlp(u)) + second.post_feedforward_layernorm(second.mlp(u))
        naive = copy.deepcopy(wide)
        naive._forward_pre_hooks.clear()
        miss = (run.block(naive, x) - y).norm() / (y - x).norm()
    assert miss > 0.1

    g, f = spec.num_kv_heads, spec.intermediate_size
    for groups, channels, down in (([0, 2], range(f), None), (range(g), range(0, 2 * f, 2), None),
                                   (range(g), range(0, 2 * f, 2), torch.zeros(spec.hidden_size, f, dtype=spec.dtype))):
        with pytest.raises(ValueError, match=f"is refused on 'olmo2'.*{OLMO2_RUNS}"):
            prune_block(wide, arch, model.config, 0, groups, channels, down_proj=down)
    with pytest.raises(ValueError, match="keeping some KV groups of a block is refused on 'olmo2': .*RMS over all heads"):
        select_block(first, arch, model.config, 0, [0], range(f))
    # a refit down_proj of one block's MLP whole runs, approximately (the absorb): that block's norms kept
    down = torch.zeros(spec.hidden_size, f, dtype=spec.dtype)
    for source in (wide, first):
        refitted = prune_block(source, arch, model.config, 0, range(g), range(f), down_proj=down)
        assert_same_block(refitted, _folded(first, arch, model.config), but=["mlp.down_proj.weight"])


def test_olmo2_refits_run_approximately_and_record_their_error():
    assert "approximate" in architecture_for(_model("olmo2")).refit_approximation
    _, plan = get_strategy("cut-absorb")(_model("olmo2"), CALIBRATION, progress=False).compress(remove=1)
    (merge,) = plan.merges
    assert merge.selection["refit"]["approximation"].startswith("approximate: post_feedforward_layernorm")
    errors = merge.selection["refit"]["unexplained"]
    assert errors["best direction"] <= errors["refitted"] < errors["unrefitted"]
