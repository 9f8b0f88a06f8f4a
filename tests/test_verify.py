"""verify_architecture: a registered description checked on a tiny random model of its family."""

from dataclasses import replace

import pytest
from transformers import AutoConfig

from flatten import ARCHITECTURES, Architecture, register_architecture, verify_architecture


@pytest.mark.parametrize("model_type", ARCHITECTURES.names())
def test_every_registered_architecture_verifies(model_type):
    verify_architecture(AutoConfig.for_model(model_type))


@pytest.fixture
def gemma():
    """Gemma's norms scale by ``1 + weight``; flatten does not register the family."""
    yield AutoConfig.for_model("gemma")
    if "gemma" in ARCHITECTURES:
        ARCHITECTURES.unregister("gemma")


def test_a_family_whose_norm_scales_by_one_plus_weight_verifies_when_it_says_so(gemma):
    register_architecture(Architecture("gemma", norm="rms+1"))
    verify_architecture(gemma)


def test_a_wrong_norm_form_is_caught_not_folded_silently(gemma):
    register_architecture(Architecture("gemma"))  # declares weight * x / rms(x)
    with pytest.raises(ValueError, match=r"'gemma' fails .* norms folded does not compute what it should"):
        verify_architecture(gemma)


def test_wrong_paths_are_caught():
    llama = ARCHITECTURES.get("llama")
    register_architecture(replace(llama, o_proj="mlp.down_proj", down_proj="self_attn.o_proj"), replace=True)
    try:
        with pytest.raises(ValueError, match="'llama' fails on a tiny random LlamaForCausalLM"):
            verify_architecture(AutoConfig.for_model("llama"))
    finally:
        register_architecture(llama, replace=True)


def test_an_unknown_norm_form_is_refused_at_registration():
    with pytest.raises(ValueError, match=r"declares norm 'layer', which the kernel cannot fold; it folds only"):
        Architecture("somefamily", norm="layer")


@pytest.mark.parametrize("declared, caught", [
    ({"qk_norm": "channel"}, r"q_norm has 8 weights; a 'channel' q/k norm .* has 32 here"),
    ({"q_norm": None, "k_norm": None}, r"does not describe: \['self_attn.k_norm.weight', 'self_attn.q_norm.weight'\]"),
])
def test_a_wrong_qk_norm_is_caught(declared, caught):
    qwen3 = ARCHITECTURES.get("qwen3")
    register_architecture(replace(qwen3, **declared), replace=True)
    try:
        with pytest.raises(ValueError, match=caught):
            verify_architecture(AutoConfig.for_model("qwen3"))
    finally:
        register_architecture(qwen3, replace=True)


def test_norms_declared_in_the_wrong_place_are_caught():
    """OLMo 2 with its two post-norms swapped: the kernel alone would not notice (it treats both alike)."""
    olmo2 = ARCHITECTURES.get("olmo2")
    register_architecture(replace(olmo2, attn_post_norm=olmo2.mlp_post_norm, mlp_post_norm=olmo2.attn_post_norm),
                          replace=True)
    try:
        with pytest.raises(ValueError, match="the MLP's input is not what the description's norms"):
            verify_architecture(AutoConfig.for_model("olmo2"))
    finally:
        register_architecture(olmo2, replace=True)


@pytest.mark.parametrize("declared, refused", [
    ({"qk_norm": "rows"}, r"declares qk_norm 'rows'; known: 'head': .*; 'channel': "),
    ({"q_norm": "self_attn.q_norm"}, r"declares q_norm='self_attn.q_norm' and k_norm=None: .* both .* or neither"),
    ({"attn_norm": None}, r"declares no norm around its attention: each sub-layer needs a norm before it"),
    ({"mlp_norm": None}, r"declares no norm around its MLP"),
    ({"attn_norm": None, "attn_post_norm": "post_attention_layernorm"},
     r"names 'post_attention_layernorm' twice, as mlp_norm and as attn_post_norm"),
])
def test_a_description_the_code_cannot_honour_is_refused_at_registration(declared, refused):
    with pytest.raises(ValueError, match=refused):
        Architecture("somefamily", **declared)
