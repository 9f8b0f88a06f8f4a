"""Architecture adapters: where a decoder block keeps its norms and projections, and where its norms sit.

An adapter is data, not code. Every path is an attribute path relative to one decoder block (or, for
``layers``, relative to the ``*ForCausalLM`` model); config fields are attribute names on the model's config.
A new LLaMA-like family is one ``register_architecture(Architecture("name"))`` call, with overrides only
where its names differ. A norm sits before a sub-layer (its weight folds into the projections that read it),
after it (on its output, before the residual add: OLMo 2), both (Gemma 3's four norms per block), or on the
projected queries and keys (Qwen3, OLMo 2, Gemma 3). A norm's form is ``weight * x / rms(x)`` or, Gemma's,
``(1 + weight) * x / rms(x)`` (``norm``).
Projections kept in one fused weight (Phi-3's ``qkv_proj``, ``gate_up_proj``) are declared in ``fused``; the
rest of the library sees them as the virtual projections q/k/v/gate/up. ``gguf`` names the family's llama.cpp
counterpart, which is all GGUF export needs of it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatten.models.exactness import Exactness
from flatten.models.fused import Projections, check_fusions
from flatten.registry import Registry


@dataclass(frozen=True)
class BlockShape:
    """The width of one decoder block."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def head_rows(self, groups: Tensor) -> Tensor:
        """Row indices of ``q_proj`` (columns of ``o_proj``) for the query heads of the KV groups ``groups``,
        in group order."""
        heads = (groups[:, None] * self.group_size + torch.arange(self.group_size)).reshape(-1)
        return (heads[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1)

    def kv_rows(self, groups: Tensor) -> Tensor:
        """Row indices of ``k_proj``/``v_proj`` for the KV heads ``groups``."""
        return (groups[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1)


NORMS = {"rms": "weight * x / rms(x)", "rms+1": "(1 + weight) * x / rms(x)"}  # what the kernel can fold
QK_NORMS = {  # what a q/k norm normalises over
    "head": "each head's query (key) alone, with one weight of head_dim shared by every head (Qwen3)",
    "channel": "all heads' queries (keys) together, with one weight per channel (OLMo 2)",
}
ROTARY = {  # how llama.cpp's graph of an architecture pairs the dimensions it rotates
    "halves": "dimension i with i + head_dim / 2, as transformers does: q/k rows written as they are",
    "pairs": "dimension 2i with 2i + 1 (llama.cpp's LLaMA graph): q/k rows permuted when written",
}


@dataclass(frozen=True)
class Gguf:
    """A family's counterpart in llama.cpp, for GGUF export: ``arch``, the name llama.cpp gives the
    architecture (a value of ``gguf.MODEL_ARCH_NAMES``, whose tensor-name map names every weight), ``rotary``,
    a key of ``ROTARY``, ``sliding_window``: llama.cpp's graph reads ``attention.sliding_window`` (the
    config's, 0 for none: Phi-3 tells Phi-4 apart by it), and ``global_every``: that graph (and transformers'
    GGUF loader) makes every ``global_every``-th layer global attention and the others sliding-window, a
    pattern no GGUF key overrides (Gemma 3: 6), so a model whose ``layer_types`` differ cannot be written
    (0: no such pattern)."""

    arch: str
    rotary: str = "halves"
    sliding_window: bool = False
    global_every: int = 0

    def __post_init__(self):
        if isinstance(self.global_every, bool) or not isinstance(self.global_every, int) or self.global_every < 0:
            raise ValueError(f"GGUF counterpart {self.arch!r} declares global_every={self.global_every!r}; give an "
                             "int >= 0 (0: no fixed pattern of global and sliding-window layers)")
        if self.rotary not in ROTARY:
            known = "; ".join(f"{key!r}: {form}" for key, form in ROTARY.items())
            raise ValueError(f"GGUF counterpart {self.arch!r} declares rotary {self.rotary!r}; known: {known}")


# registered strategies by what they need of a block, for refusals that say what runs on a family


@dataclass(frozen=True)
class Architecture(Exactness):
    """Where a family keeps the parts of a decoder block, where its norms sit and what they compute (``norm``,
    a key of ``NORMS``; ``qk_norm``, a key of ``QK_NORMS``). A norm path of None: the block has no such norm.
    ``flatten.verify_architecture(model)`` checks a description on a tiny random model."""

    model_type: str
    layers: str = "model.layers"
    attn_norm: str | None = "input_layernorm"  # before the attention
    mlp_norm: str | None = "post_attention_layernorm"  # before the MLP
    attn_post_norm: str | None = None  # on the attention's output (after o_proj), before the residual add
    mlp_post_norm: str | None = None  # on the MLP's output (after down_proj), before the residual add
    q_norm: str | None = None  # on the projected queries, before RoPE
    k_norm: str | None = None  # on the projected keys, before RoPE
    qk_norm: str = "head"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    # config attribute names
    num_heads_field: str = "num_attention_heads"
    num_kv_heads_field: str = "num_key_value_heads"
    head_dim_field: str = "head_dim"
    intermediate_size_field: str = "intermediate_size"
    num_layers_field: str = "num_hidden_layers"
    # config lists with one entry per layer (shrunk when layers are removed)
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    # config ints counting leading layers (lowered when a layer below them is removed)
    layer_count_fields: tuple[str, ...] = ()
    norm: str = "rms"
    # a down_proj refit through mlp_post_norm (a norm between down_proj and the residual add, so the block's
    # output is not linear in down_proj): False refuses it; True fits down_proj by least squares to the output
    # direction per token that comes closest to the target through that norm, an approximation whose error each
    # refit measures on the calibration tokens and records (``refit_approximation``; Gemma 3, OLMo 2)
    post_norm_refit: bool = False
    # fused projections: (path of the one weight, the fields of flatten.models.fused.FUSABLE it holds, in row order).
    # The fields' paths then name virtual projections, slices of it: the kernel, calibration and scorers see those, and
    # a block built from them holds the fused weight again (Phi-3: qkv_proj, gate_up_proj)
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    gguf: Gguf | None = None  # the family's llama.cpp counterpart (None: no GGUF export)

    def __post_init__(self):
        _check_description(self)

    def norm_scale(self, weight: Tensor) -> Tensor:
        """The per-channel factor a norm with this ``weight`` applies after dividing by ``rms(x)``."""
        return weight + 1 if self.norm == "rms+1" else weight

    def norm_weight(self, scale: Tensor) -> Tensor:
        """The norm weight whose per-channel factor is ``scale``."""
        return scale - 1 if self.norm == "rms+1" else scale

    @property
    def projections(self) -> Projections:
        """The block's projections as it holds them: fused weights split into virtual projections and back."""
        return Projections({path: tuple(getattr(self, field) for field in fields) for path, fields in self.fused},
                           self.q_proj, self.gate_proj, self.up_proj, self.o_proj, self.down_proj)

    @property
    def attn_readers(self) -> tuple[str, ...]:
        """Projections that read the attention norm's output (concatenated along outputs)."""
        return (self.q_proj, self.k_proj, self.v_proj)

    @property
    def mlp_readers(self) -> tuple[str, ...]:
        """Projections that read the MLP norm's output (concatenated along outputs)."""
        return (self.gate_proj, self.up_proj)

    @property
    def writers(self) -> tuple[str, ...]:
        """Projections that write into the residual stream (concatenated along inputs)."""
        return (self.o_proj, self.down_proj)

    @property
    def pre_norms(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Each norm before a sub-layer, with the projections that read its output (its weight folds into them)."""
        return tuple((norm, readers) for norm, readers in ((self.attn_norm, self.attn_readers),
                                                           (self.mlp_norm, self.mlp_readers)) if norm is not None)

    @property
    def mlp_input(self) -> str:
        """The module whose input is the MLP sub-layer's (the residual stream): the norm before the MLP, or the
        MLP itself where there is none."""
        return self.mlp_norm if self.mlp_norm is not None else self.gate_proj.rsplit(".", 1)[0]

    @property
    def norms(self) -> tuple[str, ...]:
        """Every norm of the block: before and after the sub-layers, on the queries and keys."""
        return tuple(path for path in (self.attn_norm, self.mlp_norm, self.attn_post_norm, self.mlp_post_norm,
                                       self.q_norm, self.k_norm) if path is not None)

    def layers_of(self, model: nn.Module) -> nn.ModuleList:
        try:
            layers = model.get_submodule(self.layers)
        except AttributeError:
            raise ValueError(
                f"model of type {type(model).__name__} has no decoder-layer list at {self.layers!r} "
                f"(architecture {self.model_type!r} expects one)"
            ) from None
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{self.layers!r} of {type(model).__name__} is a {type(layers).__name__}, not a ModuleList")
        return layers

    def shape_of(self, config) -> BlockShape:
        """The block shape the config declares."""
        heads = getattr(config, self.num_heads_field)
        kv_heads = getattr(config, self.num_kv_heads_field, None) or heads
        if heads % kv_heads:
            raise ValueError(f"{self.num_heads_field} = {heads} is not a multiple of {self.num_kv_heads_field} = "
                             f"{kv_heads}: the query heads must split evenly into KV groups")
        head_dim = getattr(config, self.head_dim_field, None) or config.hidden_size // heads
        return BlockShape(heads, kv_heads, head_dim, getattr(config, self.intermediate_size_field))

    def block_shape(self, block: nn.Module, config) -> BlockShape:
        """The shape a block really has, read off its weights (a wide block differs from its config)."""
        self.check_block(block)
        head_dim = self.shape_of(config).head_dim
        q_rows, k_rows, channels = (self.projections.of(block, path)[0].shape[0]
                                    for path in (self.q_proj, self.k_proj, self.gate_proj))
        if self.q_norm is not None:
            for path, rows in ((self.q_norm, q_rows), (self.k_norm, k_rows)):
                size, want = block.get_submodule(path).weight.numel(), head_dim if self.qk_norm == "head" else rows
                if size != want:
                    raise ValueError(f"{type(block).__name__}.{path} has {size} weights; a {self.qk_norm!r} q/k norm "
                                     f"(over {QK_NORMS[self.qk_norm]}) has {want} here: check qk_norm of "
                                     f"architecture {self.model_type!r}")
        return BlockShape(q_rows // head_dim, k_rows // head_dim, head_dim, channels)

    def config_with_shape(self, config, shape: BlockShape):
        """A copy of ``config`` that declares blocks of ``shape``."""
        wide = copy.deepcopy(config)
        setattr(wide, self.num_heads_field, shape.num_heads)
        setattr(wide, self.num_kv_heads_field, shape.num_kv_heads)
        setattr(wide, self.head_dim_field, shape.head_dim)
        setattr(wide, self.intermediate_size_field, shape.intermediate_size)
        return wide

    def check_block(self, block: nn.Module) -> None:
        """Raise a clear error if the block lacks a part this description names."""
        for path in self.projections.modules(self.norms + self.attn_readers + self.mlp_readers + self.writers):
            try:
                module = block.get_submodule(path)
            except AttributeError:
                raise ValueError(
                    f"{type(block).__name__} has no {path!r}: it is not a pre-norm block laid out as "
                    f"architecture {self.model_type!r} describes (a fused projection is declared in fused)"
                ) from None
            if getattr(module, "weight", None) is None:
                raise ValueError(f"{type(block).__name__}.{path} has no weight")
            if path in self.norms and getattr(module, "bias", None) is not None:
                raise ValueError(f"{type(block).__name__}.{path} has a bias: a LayerNorm-style norm cannot be "
                                 f"folded; the kernel folds only {', '.join(NORMS.values())}")


ARCHITECTURES: Registry[Architecture] = Registry("architecture")


def register_architecture(arch: Architecture, *, replace: bool = False) -> Architecture:
    if not isinstance(arch, Architecture):
        raise TypeError(f"register_architecture takes an Architecture, got {type(arch).__name__}")
    return ARCHITECTURES.register(arch.model_type, arch, replace=replace)


def _check_description(arch: Architecture) -> None:
    """Refuse a description the code cannot honour, with what is accepted."""
    if arch.norm not in NORMS:
        known = "; ".join(f"{key!r}: {form}" for key, form in NORMS.items())
        raise ValueError(f"architecture {arch.model_type!r} declares norm {arch.norm!r}, which the kernel "
                         f"cannot fold; it folds only these ({known})")
    if arch.qk_norm not in QK_NORMS:
        known = "; ".join(f"{key!r}: over {form}" for key, form in QK_NORMS.items())
        raise ValueError(f"architecture {arch.model_type!r} declares qk_norm {arch.qk_norm!r}; known: {known}")
    if (arch.q_norm is None) != (arch.k_norm is None):
        raise ValueError(f"architecture {arch.model_type!r} declares q_norm={arch.q_norm!r} and "
                         f"k_norm={arch.k_norm!r}: a block normalises both queries and keys, or neither")
    for sublayer, before, after in (("attention", "attn_norm", "attn_post_norm"), ("MLP", "mlp_norm", "mlp_post_norm")):
        if getattr(arch, before) is None and getattr(arch, after) is None:
            raise ValueError(f"architecture {arch.model_type!r} declares no norm around its {sublayer}: each "
                             f"sub-layer needs a norm before it ({before}), after it ({after}) or both")
    named: dict[str, str] = {}
    for field in ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm", "q_norm", "k_norm", "q_proj",
                  "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        path = getattr(arch, field)
        if path is not None and named.setdefault(path, field) != field:
            raise ValueError(f"architecture {arch.model_type!r} names {path!r} twice, as {named[path]} and as "
                             f"{field} (set the one the block does not have to None)")
    if arch.gguf is not None and not isinstance(arch.gguf, Gguf):
        raise ValueError(f"architecture {arch.model_type!r} declares gguf={arch.gguf!r}; give a "
                         "flatten.models.architectures.Gguf (llama.cpp's architecture name, its rotary layout) or None")
    check_fusions(arch.model_type, arch.fused, named)


def architecture_for(model_or_config) -> Architecture:
    """The adapter for a model (or config), chosen by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(ARCHITECTURES.names())} "
            "(register a new one with flatten.register_architecture)"
        )
    return ARCHITECTURES.get(model_type)


register_architecture(Architecture("llama", gguf=Gguf("llama", rotary="pairs")))
register_architecture(Architecture("mistral", gguf=Gguf("llama", rotary="pairs")))
register_architecture(Architecture("qwen2", layer_count_fields=("max_window_layers",), gguf=Gguf("qwen2")))
register_architecture(Architecture("qwen3", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", qk_norm="head",
                                   layer_count_fields=("max_window_layers",), gguf=Gguf("qwen3")))
register_architecture(Architecture("phi3", fused=(("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                                  ("mlp.gate_up_proj", ("gate_proj", "up_proj"))),
                                   gguf=Gguf("phi3", sliding_window=True)))
register_architecture(Architecture("gemma3_text", attn_norm="input_layernorm", mlp_norm="pre_feedforward_layernorm",
                                   attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm",
                                   q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", qk_norm="head", norm="rms+1",
                                   post_norm_refit=True, gguf=Gguf("gemma3", sliding_window=True, global_every=6)))
register_architecture(Architecture("olmo2", attn_norm=None, mlp_norm=None, attn_post_norm="post_attention_layernorm",
                                   mlp_post_norm="post_feedforward_layernorm", q_norm="self_attn.q_norm",
                                   k_norm="self_attn.k_norm", qk_norm="channel", post_norm_refit=True))
