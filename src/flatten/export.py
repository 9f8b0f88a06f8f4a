"""GGUF export: a checkpoint (compressed or not) as a GGUF file for llama.cpp and its front ends, written with
the ``gguf`` package (llama.cpp's own writer, tensor-name maps and vocabulary readers).

The tokenizer's entries are copied from a GGUF file when there is one (the embedded models come as GGUF, so
GGUF in, compressed GGUF out), else read from the folder's ``tokenizer.json`` (byte-level BPE).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from flatten.architectures import architecture_for
from flatten.dispatch import load_offloaded
from flatten.files import write_atomically

OUTTYPES = ("f32", "f16", "q8_0")
GGUF_ARCHES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}  # config.model_type -> gguf.MODEL_ARCH
PERMUTED = ("LLAMA",)  # llama.cpp's LLaMA graph expects q and k rows in its own rotary order


def _arch(model: nn.Module):
    import gguf

    model_type = model.config.model_type
    if model_type not in GGUF_ARCHES:
        raise ValueError(f"GGUF export knows the families {', '.join(sorted(GGUF_ARCHES))}, not {model_type!r}")
    if _rope(model.config).get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export writes plain RoPE only; the model's is {_rope(model.config)}")
    return getattr(gguf.MODEL_ARCH, GGUF_ARCHES[model_type])


def _rope(config) -> dict:
    return getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta, "rope_type": "default"}


def _rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """q or k rows from the half-split rotary layout of transformers to the interleaved one of llama.cpp."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensors(model: nn.Module, arch, outtype: str):
    """``(gguf name, array, raw dtype or None)`` for every weight of ``model``."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tied = getattr(config, "tie_word_embeddings", False)
    permuted = GGUF_ARCHES[config.model_type] in PERMUTED
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reads the embedding as the output layer when there is none
        found = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ValueError(f"no GGUF name for the tensor {name!r} of a {config.model_type} model")
        tensor = load_offloaded(model, name) if tensor.is_meta else tensor.detach()
        data = tensor.to(torch.float32).cpu().numpy()
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            data = _rotary_rows(data, heads if "q_proj" in name else kv_heads)
        if outtype == "f32" or data.ndim == 1:
            yield found, data, None
        elif outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
            yield found, gguf.quants.quantize(data, kind), kind
        else:
            yield found, data.astype(np.float16), None


def _hyperparameters(writer, model: nn.Module, outtype: str) -> None:
    import gguf

    config = model.config
    shape = architecture_for(model).shape_of(config)
    writer.add_name(Path(getattr(config, "_name_or_path", "") or "model").name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(shape.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
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
    """Write ``model`` (a stock checkpoint of a registered family: LLaMA, Mistral, Qwen2) into the GGUF file
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
    arch = _arch(model)
    path = Path(path)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        _hyperparameters(writer, model, outtype)
        if source.is_file():
            _tokenizer_from_gguf(writer, source)
        else:
            _tokenizer_from_folder(writer, source)
        for name, data, raw_dtype in _tensors(model, arch, outtype):
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
    from flatten.models import EMBEDDED_MODELS, embedded_model_path
    from flatten.report import RUN_RECORD, RunRecord

    source = Path(model_source)
    if str(model_source) in EMBEDDED_MODELS:
        return embedded_model_path(str(model_source))
    if source.is_dir() and (source / RUN_RECORD).is_file():
        base = RunRecord.load(source).base_model
        if base in EMBEDDED_MODELS or base.endswith(".gguf") and Path(base).is_file():
            return tokenizer_source(base)
    return source
