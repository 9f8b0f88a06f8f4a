"""Tiny random models of every registered architecture, and helpers to run one block on its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from flatten import ARCHITECTURES, architecture_for


@dataclass(frozen=True)
class TinySpec:
    model_type: str
    hidden_multiple: int  # hidden size in query heads (the configs require it to divide evenly)
    num_kv_heads: int
    group_size: int
    head_dim: int
    intermediate_size: int
    num_layers: int = 4
    bias: bool = False
    dtype: torch.dtype = torch.float64
    attn_implementation: str = "eager"
    seed: int = 0
    same_qk_norms: bool = True  # q/k norm weights equal in every block (Qwen3's merges are exact only then)

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.group_size

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.hidden_multiple


def mergeable() -> list[str]:
    """The registered families whose blocks can flatten exactly (OLMo 2's cannot: ``merge_refusal`` says why)."""
    return [name for name in ARCHITECTURES.names() if ARCHITECTURES.get(name).merge_refusal is None]


def tiny_specs(model_types=None, dtypes=(torch.float32, torch.float64), num_layers=st.integers(2, 5)):
    """Tiny specs of ``model_types`` (default: the families whose merges can be exact, ``mergeable()``)."""
    return st.builds(
        TinySpec,
        model_type=st.sampled_from(model_types or mergeable()),
        hidden_multiple=st.integers(1, 4),
        num_kv_heads=st.integers(1, 3),
        group_size=st.integers(1, 4),
        head_dim=st.sampled_from([2, 4, 8]),
        intermediate_size=st.integers(4, 40),
        num_layers=num_layers,
        bias=st.booleans(),
        dtype=st.sampled_from(dtypes),
        attn_implementation=st.sampled_from(["eager", "sdpa"]),
        seed=st.integers(0, 2**16),
    )


def tiny_model(spec: TinySpec, **config_overrides):
    """A randomly initialised ``*ForCausalLM`` whose weights, biases and norm weights are all O(1)."""
    arch = ARCHITECTURES.get(spec.model_type)
    fields = {
        arch.num_heads_field: spec.num_heads,
        arch.num_kv_heads_field: spec.num_kv_heads,
        arch.head_dim_field: spec.head_dim,
        arch.intermediate_size_field: spec.intermediate_size,
        arch.num_layers_field: spec.num_layers,
    }
    config = AutoConfig.for_model(
        spec.model_type, vocab_size=61, hidden_size=spec.hidden_size, max_position_embeddings=128,
        attention_bias=spec.bias, mlp_bias=spec.bias, tie_word_embeddings=False, **fields, **config_overrides,
    )
    for field in ("pad_token_id", "bos_token_id", "eos_token_id"):  # Phi-3's default to ids of a 32k vocabulary
        if isinstance(getattr(config, field, None), int) and getattr(config, field) >= config.vocab_size:
            setattr(config, field, None)
    config._attn_implementation = spec.attn_implementation
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config).to(spec.dtype).eval()
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.empty_like(p).uniform_(-1.5, 1.5, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) / p.shape[-1] ** 0.5)
        if spec.same_qk_norms and arch.q_norm is not None:
            first = arch.layers_of(model)[0]
            for block in arch.layers_of(model)[1:]:
                for path in (arch.q_norm, arch.k_norm):
                    block.get_submodule(path).weight.copy_(first.get_submodule(path).weight)
    assert architecture_for(model) is arch
    return model


class BlockRunner:
    """Runs blocks and their sub-layers of ``model`` on a hidden-state tensor, with RoPE and a causal mask (where
    layers differ in RoPE, Gemma 3's ``layer_types``, each block's own; the mask is causal, no sliding window)."""

    def __init__(self, model, x: torch.Tensor):
        batch, length, _ = x.shape
        positions = torch.arange(length).expand(batch, length)
        rotary = model.model.rotary_emb
        types = getattr(rotary, "layer_types", None)
        self.rope = ({kind: rotary(x, positions, kind) for kind in types} if types is not None
                     else rotary(x, positions))
        mask = torch.full((length, length), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
        self.mask = mask.expand(batch, 1, length, length)
        self.positions = positions

    def _rope(self, block):
        return self.rope[block.self_attn.layer_type] if isinstance(self.rope, dict) else self.rope

    def block(self, block, x):
        return block(x, attention_mask=self.mask, position_ids=self.positions, position_embeddings=self._rope(block))

    def attention(self, block, z):
        return block.self_attn(hidden_states=z, attention_mask=self.mask, position_embeddings=self._rope(block))[0]


def pair_inputs(model, position: int, calibration: torch.Tensor, batch_size: int = 2):
    """``(BlockPair at position, its input on the calibration batches, its layers' other arguments)``."""
    from flatten import BlockPair
    from flatten.calibration import capture, run_block

    pair = BlockPair(model, position)
    inputs = capture(model, pair.arch, list(calibration.split(batch_size)))
    hidden = inputs.hidden
    for i in range(position):
        hidden = run_block(pair.arch.layers_of(model)[i], hidden, inputs.calls[i])
    return pair, hidden, inputs.calls[position]


def random_hidden(spec: TinySpec, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, spec.hidden_size, generator=generator, dtype=torch.float64).to(spec.dtype)


FLOAT32_NORMS = {"gemma3_text"}  # families whose norms compute in float32 even in a float64 model


def tolerance(dtype: torch.dtype, model_type: str | None = None) -> dict:
    if model_type in FLOAT32_NORMS:
        return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}
    return {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}


CALIBRATION = torch.randint(0, 61, (8, 16), generator=torch.Generator().manual_seed(0))  # the tiny models' vocabulary
STRATEGY_OPTIONS = {"laco": {"collapse": 2}}  # LaCo's default collapses 4 blocks at a time: too many for 6


def greedy(model, ids, use_cache: bool, new_tokens: int = 6):
    """``new_tokens`` greedily generated after ``ids``, with or without the KV cache."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


def assert_same_block(got, want, *, but=()):
    """``got`` holds exactly ``want``'s tensors, names and values, except those named in ``but``."""
    a, b = (_state(block) for block in (got, want))
    assert a.keys() == b.keys()
    for key in a.keys() - set(but):
        assert torch.equal(a[key], b[key]), key


def _state(block):
    return {name: t.detach().clone() for name, t in block.state_dict().items()}
