"""GGUF export: a checkpoint (compressed or not) as a GGUF file for llama.cpp and its front ends, written with
the ``gguf`` package (llama.cpp's own writer, tensor-name maps and vocabulary readers).

What a family needs for it is in its registration: ``Architecture.gguf`` names its llama.cpp counterpart (whose
tensor-name map names every weight, fused ones included), how that graph rotates q and k, and whether it reads
a sliding window; norms of the form ``(1 + weight)`` are written as llama.cpp computes them. A registered family
without a counterpart is refused with the list of those that export (``exportable()``).

The tokenizer's entries are copied from a GGUF file when there is one (the embedded models come as GGUF, so
GGUF in, compressed GGUF out), else read from the folder's ``tokenizer.json`` (byte-level BPE).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flatten.files import write_atomically
from flatten.models.architectures import ARCHITECTURES, architecture_for
from flatten.models.dispatch import load_offloaded

OUTTYPES = ("f32", "f16", "q8_0")


def exportable() -> list[str]:
    """The registered families GGUF export writes: those whose ``Architecture.gguf`` names a llama.cpp
    counterpart."""
    return [name for name in ARCHITECTURES.names() if ARCHITECTURES.get(name).gguf is not None]


def _arch(model: nn.Module):
    """``(Architecture, gguf.MODEL_ARCH)`` of ``model``, refused with the reason where it cannot be written."""
    import gguf

    arch = architecture_for(model)
    if arch.gguf is None:
        raise ValueError(f"GGUF export needs a family's llama.cpp counterpart, and architecture {arch.model_type!r} "
                         f"declares none (Architecture.gguf); the families that export: {', '.join(exportable())}")
    found = [key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch.gguf.arch]
    if not found:
        raise ValueError(f"architecture {arch.model_type!r} exports as llama.cpp's {arch.gguf.arch!r}, which the "
                         "installed gguf package does not know (upgrade gguf)")
    if arch.gguf.rotary == "pairs" and any(path in parts for parts in arch.projections.fused.values()
                                           for path in (arch.q_proj, arch.k_proj)):
        raise ValueError(f"architecture {arch.model_type!r} fuses q_proj or k_proj, whose rows llama.cpp's "
                         f"{arch.gguf.arch!r} wants permuted: GGUF export permutes only unfused ones")
    _check_layer_types(model.config, arch)
    local = _ropes(model.config).get("sliding_attention", {}).get("rope_type", "default")
    if local != "default":
        raise ValueError(f"GGUF export writes plain RoPE on sliding-window layers; the model's is {local!r}")
    rope = _rope(model.config)
    kind = rope.get("rope_type", "default")
    if kind == "longrope" and gguf.MODEL_TENSOR.ROPE_FACTORS_LONG not in gguf.MODEL_TENSORS[found[0]]:
        raise ValueError(f"llama.cpp's {arch.gguf.arch!r} has no tensors for longrope's factors; GGUF export "
                         "writes plain RoPE for it")
    if kind not in ("default", "longrope"):
        raise ValueError(f"GGUF export writes plain RoPE and longrope (Phi-3); the model's is {rope}")
    return arch, found[0]


def _check_layer_types(config, arch) -> None:
    """Refuse a model the fixed pattern of global and sliding-window layers of its llama.cpp counterpart
    (``Gguf.global_every``) or that graph's attention scale would misdescribe."""
    every = arch.gguf.global_every
    if not every:
        return
    count = config.num_hidden_layers
    pattern = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(count)]
    types = list(getattr(config, "layer_types", None) or pattern)
    if types != pattern:
        moved = [i for i, (have, want) in enumerate(zip(types, pattern)) if have != want]
        raise ValueError(f"llama.cpp's {arch.gguf.arch!r} (and transformers' GGUF loader) makes every {every}th layer "
                         f"global attention and the rest sliding-window, and no GGUF key says otherwise; this model's "
                         f"layer_types differ at blocks {', '.join(map(str, moved))} (removing blocks moves its global "
                         "layers), so its GGUF would compute other attention. Save it as a checkpoint instead")
    head_dim = arch.shape_of(config).head_dim
    scalar = getattr(config, "query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        raise ValueError(f"llama.cpp's {arch.gguf.arch!r} scales attention by 1/sqrt(head_dim) = 1/sqrt({head_dim}); "
                         f"this model's query_pre_attn_scalar is {scalar}")


def _ropes(config) -> dict:
    """The model's RoPE by attention type (``full_attention``, and ``sliding_attention`` where the layers differ:
    Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta, "rope_type": "default"}
    return rope if isinstance(rope.get("full_attention"), dict) else {"full_attention": rope}


def _rope(config) -> dict:
    """The RoPE of the full-attention layers (llama.cpp's ``rope.*``), as llama.cpp's converter takes it."""
    return _ropes(config)["full_attention"]


def _rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """q or k rows from the half-split rotary layout of transformers to the interleaved one of llama.cpp."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _stored(data: np.ndarray, outtype: str):
    """``(array, raw dtype or None)`` as a tensor of ``outtype`` is written."""
    import gguf

    if outtype == "f32" or data.ndim == 1:
        return data, None
    if outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data, kind), kind
    return data.astype(np.float16), None


def _tensors(model: nn.Module, arch, gguf_arch, outtype: str):
    """``(gguf name, array, raw dtype or None)`` for every weight of ``model``, and longrope's factors."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tied = getattr(config, "tie_word_embeddings", False)
    permuted = {f"{arch.q_proj}.weight": heads, f"{arch.k_proj}.weight": kv_heads} if arch.gguf.rotary == "pairs" else {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reads the embedding as the output layer when there is none
        found = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ValueError(f"no GGUF name for the tensor {name!r} of a {config.model_type} model in llama.cpp's "
                             f"{arch.gguf.arch!r}")
        tensor = load_offloaded(model, name) if tensor.is_meta else tensor.detach()
        data = tensor.to(torch.float32).cpu().numpy()
        rows = next((count for suffix, count in permuted.items() if name.endswith(f".{suffix}")), None)
        if rows is not None:
            data = _rotary_rows(data, rows)
        if arch.norm == "rms+1" and name.endswith("norm.weight"):
            data = data + 1  # llama.cpp's norms scale by their weight: (1 + weight) written out, as its converter does
        yield (found, *_stored(data, outtype))
    rope = _rope(config)
    if rope.get("rope_type") == "longrope":  # one factor per rotated pair, short below the original context
        for kind, key in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                          (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor")):
            yield f"{gguf.TENSOR_NAMES[kind]}.weight", np.asarray(rope[key], dtype=np.float32), None


def _hyperparameters(writer, model: nn.Module, arch, outtype: str) -> None:
    import gguf

    config = model.config
    shape = arch.shape_of(config)
    rope = _rope(config)
    writer.add_name(Path(getattr(config, "_name_or_path", "") or "model").name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(shape.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if "sliding_attention" in _ropes(config):  # the sliding-window layers' own base (Gemma 3's local RoPE)
        writer.add_rope_freq_base_swa(float(_ropes(config)["sliding_attention"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    writer.add_rope_dimension_count(int(shape.head_dim * partial))
    writer.add_key_length(shape.head_dim)  # llama.cpp's default, hidden / heads, is not every family's
    writer.add_value_length(shape.head_dim)
    if arch.gguf.sliding_window:
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)  # 0: none
    if rope.get("rope_type") == "longrope":
        original = rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
        scale = config.max_position_embeddings / original
        attention = rope.get("attention_factor") or (math.sqrt(1 + math.log(scale) / math.log(original))
                                                     if scale > 1 else 1.0)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(attention)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])


def _tokenizer_from_gguf(writer, source: Path) -> None:
    """Every ``tokenizer.*`` entry of ``source``, as it is."""
    import gguf

    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), value_type, sub_type)


def _tokenizer_from_folder(writer, folder: Path) -> None:
    """Byte-level BPE vocabulary, merges and special tokens from ``folder``'s tokenizer files."""
    import gguf

    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except FileNotFoundError:
        raise ValueError(f"{folder} holds no byte-level BPE tokenizer.json; give a GGUF file to copy the tokenizer "
                         "from (--tokenizer-from FILE.gguf)") from None
    tokens, _, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def export_gguf(model: nn.Module, path: str | Path, *, outtype: str = "f16", tokenizer_from: str | Path) -> Path:
    """Write ``model`` (a stock checkpoint of a registered family with a llama.cpp counterpart,
    ``Architecture.gguf``: ``exportable()``) into the GGUF file
    ``path`` (whole or not at all), its tokenizer taken from ``tokenizer_from``: a ``.gguf`` file (its
    ``tokenizer.*`` entries are copied) or a folder with a byte-level BPE ``tokenizer.json``. ``outtype``:
    ``f32``, ``f16`` (1-D tensors stay f32, as llama.cpp keeps them) or ``q8_0`` (2-D tensors whose rows
    split into blocks of 32; others f16)."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    source = Path(tokenizer_from)
    if not (source.is_dir() or source.is_file() and source.suffix == ".gguf"):
        raise FileNotFoundError(f"tokenizer_from must be a .gguf file or a checkpoint folder, got {source}")
    arch, gguf_arch = _arch(model)
    path = Path(path)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf_arch])
        _hyperparameters(writer, model, arch, outtype)
        if source.is_file():
            _tokenizer_from_gguf(writer, source)
        else:
            _tokenizer_from_folder(writer, source)
        for name, data, raw_dtype in _tensors(model, arch, gguf_arch, outtype):
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, write)
    return path


def tokenizer_source(model_source: str | Path) -> Path:
    """Where ``export_gguf`` takes the tokenizer of the model loaded from ``model_source``: the GGUF file it
    came from (a ``.gguf`` path, an embedded model's file, or either as the base model a saved folder's run
    record names), else the folder itself."""
    from flatten.models.loading import EMBEDDED_MODELS, embedded_model_path
    from flatten.models.record import RUN_RECORD, RunRecord

    source = Path(model_source)
    if str(model_source) in EMBEDDED_MODELS:
        return embedded_model_path(str(model_source))
    if source.is_dir() and (source / RUN_RECORD).is_file():
        base = RunRecord.load(source).base_model
        if base in EMBEDDED_MODELS or base.endswith(".gguf") and Path(base).is_file():
            return tokenizer_source(base)
    return source
