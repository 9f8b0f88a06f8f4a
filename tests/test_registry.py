"""New architectures plug in as data; the kernel does not change."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from flatten import ARCHITECTURES, Architecture, BlockPair, register_architecture
from tiny import BlockRunner, random_hidden, tiny_model, tiny_specs, tolerance


@pytest.fixture(scope="module")
def ministral():
    """A LLaMA-like family the package does not ship: registering it is one line."""
    register_architecture(Architecture("ministral"))
    yield
    ARCHITECTURES.unregister("ministral")


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_a_registered_llama_like_family_flattens_exactly(ministral, data):
    spec = data.draw(tiny_specs(["ministral"]))
    model = tiny_model(spec)
    first, second = model.model.layers[0], model.model.layers[1]
    x = random_hidden(spec, 2, 5)
    run = BlockRunner(model, x)
    with torch.no_grad():
        u = x + run.attention(first, first.input_layernorm(x)) + run.attention(second, second.input_layernorm(x))
        y = u + first.mlp(first.post_attention_layernorm(u)) + second.mlp(second.post_attention_layernorm(u))
        torch.testing.assert_close(run.block(BlockPair(model, 0).flatten(), x), y, **tolerance(spec.dtype))


def test_registering_twice_is_an_error(ministral):
    with pytest.raises(ValueError, match="'ministral' is already registered"):
        register_architecture(Architecture("ministral"))
    with pytest.raises(TypeError, match="takes an Architecture"):
        register_architecture("ministral")


def test_a_block_with_parts_flattening_cannot_express_is_refused():
    """Qwen3 described as LLaMA: its q/k norms are tensors the description does not cover."""
    real = ARCHITECTURES.get("qwen3")
    register_architecture(Architecture("qwen3"), replace=True)  # described as LLaMA
    try:
        config = AutoConfig.for_model("qwen3", hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=4, intermediate_size=8, num_hidden_layers=2, vocab_size=11)
        model = AutoModelForCausalLM.from_config(config)
        with pytest.raises(ValueError, match=r"does not describe: \['self_attn.k_norm.weight', 'self_attn.q_norm.weight'\]"):
            BlockPair(model, 0).flatten()
    finally:
        register_architecture(real, replace=True)


def test_a_block_that_is_not_pre_norm_is_refused():
    """OLMo 2 normalises after attention and MLP; described as LLaMA it lacks the input norm."""
    real = ARCHITECTURES.get("olmo2")
    register_architecture(Architecture("olmo2"), replace=True)  # described as LLaMA
    try:
        config = AutoConfig.for_model("olmo2", hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=8, num_hidden_layers=2, vocab_size=11)
        model = AutoModelForCausalLM.from_config(config)
        with pytest.raises(ValueError, match="has no 'input_layernorm': it is not a pre-norm block"):
            BlockPair(model, 0).flatten()
    finally:
        register_architecture(real, replace=True)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="unknown architecture 'nope'; known: (gemma3_text, )?llama, (ministral, )?mistral, olmo2, phi3, qwen2, qwen3"):
        ARCHITECTURES.get("nope")
