"""Model surgery: the model stays a stock checkpoint (save, reload, generate with a cache)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from flatten import BlockPair, save_checkpoint
from tiny import TinySpec, mergeable, tiny_model, tiny_specs


def _compress_one_pair(model, spec, index, data):
    pair = BlockPair(model, index)
    groups = data.draw(st.permutations(range(2 * spec.num_kv_heads)))[: spec.num_kv_heads]
    channels = data.draw(st.permutations(range(2 * spec.intermediate_size)))[: spec.intermediate_size]
    return pair.replace(pair.prune(pair.flatten(), groups, channels))


def _greedy(model, ids, use_cache):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


@pytest.mark.parametrize("model_type", mergeable())  # merges are refused on the others (test_families.py)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_surgery_leaves_a_checkpoint_that_reloads_and_generates(model_type, data, tmp_path_factory):
    spec = data.draw(tiny_specs([model_type], dtypes=(torch.float64,), num_layers=st.integers(3, 5)), label="spec")
    model = tiny_model(spec)
    index = data.draw(st.integers(0, spec.num_layers - 2), label="pair index")
    _compress_one_pair(model, spec, index, data)

    layers = model.model.layers
    assert len(layers) == model.config.num_hidden_layers == spec.num_layers - 1
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(layers)))
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == len(layers)

    out = tmp_path_factory.mktemp("ckpt") / "compressed"
    save_checkpoint(model, out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=spec.dtype,
                                                    attn_implementation=spec.attn_implementation).eval()
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(spec.seed))
    with torch.no_grad():
        # not bit-equal only because the reloaded RoPE buffer is float32 where the original's was cast to float64
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-12, atol=1e-12)
    assert reloaded.config.num_hidden_layers == spec.num_layers - 1
    assert torch.equal(_greedy(reloaded, ids, True), _greedy(reloaded, ids, False))
    assert torch.equal(_greedy(model, ids, True), _greedy(reloaded, ids, True))


def test_surgery_keeps_per_layer_attention_types_in_step_with_the_layers(tmp_path):
    """Qwen2 with sliding-window layers: the merged block keeps its first layer's type."""
    spec = TinySpec("qwen2", hidden_multiple=2, num_kv_heads=1, group_size=2, head_dim=4, intermediate_size=8,
                    num_layers=5, dtype=torch.float64)
    model = tiny_model(spec, use_sliding_window=True, sliding_window=3, max_window_layers=2)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 3
    pair = BlockPair(model, 1)
    pair.replace(pair.prune(pair.flatten(), [1], range(8)))
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert model.config.max_window_layers == 2
    pair = BlockPair(model, 0)
    pair.replace(pair.prune(pair.flatten(), [0], range(8)))
    assert model.config.layer_types == ["full_attention"] + ["sliding_attention"] * 2
    assert model.config.max_window_layers == 1
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [None, 3, 3]

    save_checkpoint(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64,
                                                    attn_implementation="eager").eval()
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-12, atol=1e-12)
    assert torch.equal(_greedy(reloaded, ids, True), _greedy(reloaded, ids, False))


def test_replace_changes_only_the_pair():
    spec = TinySpec("llama", hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=4, intermediate_size=6,
                    num_layers=4, bias=True)
    model = tiny_model(spec)
    before = {id(m): {k: t.clone() for k, t in m.state_dict().items()} for m in model.model.layers}
    kept = [model.model.layers[i] for i in (0, 3)]
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    pair = BlockPair(model, 1)
    new = pair.prune(pair.flatten(), [0, 3], range(6))
    pair.replace(new)
    assert list(model.model.layers) == [kept[0], new, kept[1]]
    for block in kept:
        assert all(torch.equal(t, before[id(block)][k]) for k, t in block.state_dict().items())
    assert torch.equal(model.model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, head)
    with pytest.raises(RuntimeError, match="already replaced"):
        pair.flatten()
