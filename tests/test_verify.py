"""verify_architecture: a registered description checked on a tiny random model of its family."""

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
    register_architecture(Architecture("llama", o_proj="mlp.down_proj", down_proj="self_attn.o_proj"), replace=True)
    try:
        with pytest.raises(ValueError, match="'llama' fails on a tiny random LlamaForCausalLM"):
            verify_architecture(AutoConfig.for_model("llama"))
    finally:
        register_architecture(Architecture("llama"), replace=True)


def test_an_unknown_norm_form_is_refused_at_registration():
    with pytest.raises(ValueError, match=r"declares norm 'layer', which the kernel cannot fold; it folds only"):
        Architecture("somefamily", norm="layer")
