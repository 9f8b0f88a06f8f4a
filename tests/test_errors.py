"""Bad input gets a clear error that names the problem."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flatten import BlockPair, architecture_for, flatten_blocks, prune_block, replace_span, save_checkpoint
from tiny import TinySpec, tiny_model

SPEC = TinySpec("llama", hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=4, intermediate_size=6,
                num_layers=4)


@pytest.fixture
def model():
    return tiny_model(SPEC)


@pytest.fixture
def wide(model):
    return BlockPair(model, 0).flatten()


def test_blocks_that_are_not_adjacent(model):
    with pytest.raises(ValueError, match="not adjacent"):
        BlockPair(model, 0, 2)
    with pytest.raises(ValueError, match="not adjacent"):
        BlockPair(model, model.model.layers[1], model.model.layers[0])


def test_last_block_has_no_successor(model):
    with pytest.raises(ValueError, match="last of 4 blocks"):
        BlockPair(model, 3)


def test_index_out_of_range_or_of_the_wrong_type(model):
    with pytest.raises(ValueError, match="out of range"):
        BlockPair(model, 7)
    with pytest.raises(TypeError, match="layer index or a layer module"):
        BlockPair(model, "0")
    with pytest.raises(TypeError, match="layer index or a layer module"):
        BlockPair(model, True)


def test_blocks_of_different_models(model):
    other = tiny_model(SPEC)
    with pytest.raises(ValueError, match="not a layer of this model"):
        BlockPair(model, model.model.layers[0], other.model.layers[1])


def test_blocks_of_different_shapes(model):
    other = tiny_model(TinySpec("llama", hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=4,
                                intermediate_size=10, num_layers=2))
    with pytest.raises(ValueError, match="different shapes"):
        flatten_blocks(model.model.layers[0], other.model.layers[0], architecture_for(model), model.config, 0)


def test_unsupported_architecture_lists_the_supported_ones():
    config = AutoConfig.for_model("gpt2", n_embd=8, n_layer=2, n_head=2, vocab_size=11)
    gpt2 = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'; supported: gemma3_text, llama, mistral, olmo2, phi3, qwen2, qwen3"):
        BlockPair(gpt2, 0)


@pytest.mark.parametrize(
    "groups, channels, error, message",
    [
        ([0], range(6), ValueError, r"keep_groups must select exactly 2 of 4, got 1"),
        ([0, 1, 2], range(6), ValueError, r"keep_groups must select exactly 2 of 4, got 3"),
        ([0, 1], range(5), ValueError, r"keep_channels must select exactly 6 of 12, got 5"),
        ([0, 4], range(6), ValueError, r"keep_groups must lie in \[0, 4\)"),
        ([-1, 2], range(6), ValueError, r"keep_groups must lie in \[0, 4\)"),
        ([1, 1], range(6), ValueError, r"keep_groups holds repeated indices"),
        ([0.0, 1.0], range(6), TypeError, r"keep_groups must hold integers"),
        ("01", range(6), TypeError, r"keep_groups must be a sequence of integers"),
        ([0, 1], None, TypeError, r"keep_channels must be a sequence of integers"),
        ([0, 1], [[0, 1], [2]], TypeError, r"keep_channels must be a sequence of integers"),
    ],
)
def test_a_selection_of_the_wrong_size_or_kind(model, wide, groups, channels, error, message):
    with pytest.raises(error, match=message):
        prune_block(wide, architecture_for(model), model.config, 0, groups, channels)


def test_a_replacement_weight_of_the_wrong_shape(model, wide):
    arch = architecture_for(model)
    with pytest.raises(ValueError, match=r"o_proj must have shape \(8, 16\)"):
        prune_block(wide, arch, model.config, 0, [0, 1], range(6), o_proj=torch.zeros(8, 32))
    with pytest.raises(ValueError, match="down_proj holds non-finite values"):
        prune_block(wide, arch, model.config, 0, [0, 1], range(6), down_proj=torch.full((8, 6), float("nan")))
    with pytest.raises(TypeError, match="down_proj must be a tensor"):
        prune_block(wide, arch, model.config, 0, [0, 1], range(6), down_proj=[[0.0] * 6] * 8)


def test_replacing_with_something_that_is_not_a_block(model):
    with pytest.raises(TypeError, match="must be an nn.Module"):
        replace_span(model, 0, 2, "block")
    with pytest.raises(TypeError, match="the model's blocks are LlamaDecoderLayer"):
        replace_span(model, 0, 2, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"span \[2, 9\) is not a non-empty range of the model's 4 blocks"):
        replace_span(model, 2, 9, model.model.layers[0])
    assert len(model.model.layers) == model.config.num_hidden_layers == 4


def test_a_wide_block_is_not_saved_as_a_stock_checkpoint(model, wide, tmp_path):
    BlockPair(model, 0).replace(wide)
    with pytest.raises(ValueError, match="block 0 has shape .* prune wide blocks"):
        save_checkpoint(model, tmp_path / "out")
    assert not any(tmp_path.iterdir())


def test_an_existing_output_is_not_overwritten(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_checkpoint(model, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    save_checkpoint(model, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_blocks_that_are_not_pre_norm_or_heads_that_do_not_split_into_groups(model):
    from flatten import Flattener

    calibration = torch.zeros(2, 8, dtype=torch.long)
    model.config.num_key_value_heads = 3
    with pytest.raises(ValueError, match="num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"):
        Flattener(model, calibration)
    model.config.num_key_value_heads = 2
    del model.model.layers[2].post_attention_layernorm
    with pytest.raises(ValueError, match="has no 'post_attention_layernorm': it is not a pre-norm block"):
        Flattener(model, calibration)


def test_weights_on_the_meta_device_without_a_hook_are_refused(model):
    from flatten import Flattener

    model.model.layers[1].to("meta")  # what accelerate's offload leaves in a module, here without its hook
    with pytest.raises(ValueError, match="layers.1.self_attn.q_proj.weight is on the 'meta' device and no accelerate "
                                         "hook holds its value: load the model with a device_map.*dtype='auto'"):
        Flattener(model, torch.zeros(2, 8, dtype=torch.long))
