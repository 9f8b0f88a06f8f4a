"""GGUF export: the file loads back through transformers' GGUF loader with the weights rounded as its tensor
type says and the same logits; the real SmolLM2 also with the same tokenizer."""

import json
import re
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from tiny import TinySpec, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from flatten import ARCHITECTURES, Architecture, architecture_for, register_architecture
from flatten.merge import remove_blocks
from flatten.models.architectures import Gguf
from flatten.models.export import export_gguf, exportable, tokenizer_source
from flatten.models.loading import embedded_model_path
from flatten.run.cli import main


def _bpe_folder(folder):
    """A byte-level BPE tokenizer of the tiny models' 61 tokens (what export_gguf reads from a folder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(60)}}
    backend = Tokenizer(models.BPE(vocab, merges=[], unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[UNK]",
                            pad_token="[UNK]").save_pretrained(folder)  # Phi3Config pads with 32000 otherwise
    return folder


def _rounded(weight: torch.Tensor, outtype: str) -> torch.Tensor:
    """``weight`` as the GGUF file stores it, back in float32."""
    if outtype == "f32" or weight.ndim == 1:
        return weight
    if outtype == "q8_0" and weight.shape[-1] % 32 == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), kind), kind).copy())
    return weight.half().float()


# head_dim per family where transformers' GGUF loader needs one: it reads Qwen3's as Qwen3Config's default (128),
# not from attention.key_length, which the file holds (test_a_head_dim_other_than_hidden_over_heads_is_written);
# Gemma 3's query_pre_attn_scalar as its default (256), which llama.cpp's graph takes to be head_dim
HEAD_DIM = {"qwen3": 128, "gemma3_text": 256}


def test_the_registered_families_with_a_llama_cpp_counterpart_export():
    assert {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"} <= set(exportable())
    assert "olmo2" not in exportable()


@pytest.mark.parametrize("model_type", exportable())
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_tiny_models_round_trip_through_transformers_gguf_loader(tmp_path, model_type, outtype):
    """Every registered family with a llama.cpp counterpart (Phi-3's fused qkv_proj and gate_up_proj as llama.cpp's
    attn_qkv and ffn_up), read back by transformers' GGUF loader: every weight as the file's type rounds it, and
    at f32 the same logits."""
    spec = TinySpec(model_type, hidden_multiple=8, num_kv_heads=2, group_size=2, head_dim=HEAD_DIM.get(model_type, 8),
                    intermediate_size=64, num_layers=3, dtype=torch.float32, bias=model_type == "qwen2")
    model = tiny_model(spec)
    path = export_gguf(model, tmp_path / "tiny.gguf", outtype=outtype, tokenizer_from=_bpe_folder(tmp_path / "tok"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert back.config.num_hidden_layers == 3 and back.config.num_key_value_heads == 2
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == ARCHITECTURES.get(model_type).gguf.arch
    loaded = back.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    plus_one = ARCHITECTURES.get(model_type).norm == "rms+1"  # written as 1 + w, read back as (1 + w) - 1
    for name, weight in model.state_dict().items():
        want = (weight + 1) - 1 if plus_one and name.endswith("norm.weight") else weight
        assert torch.equal(loaded[name], _rounded(want, outtype)), name
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits if outtype == "f32" else None
        got = back(ids).logits
    if expected is not None:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()


def _fields(path) -> dict:
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


def test_a_compressed_phi3_exports_with_its_fused_tensors(tmp_path):
    from flatten import Flattener

    spec = TinySpec("phi3", 8, 2, 2, 8, 64, num_layers=5, dtype=torch.float32)
    model = tiny_model(spec)
    calibration = torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(0))
    model, _ = Flattener(model, calibration, progress=False).compress(remove=2)
    path = export_gguf(model, tmp_path / "phi3.gguf", outtype="f32", tokenizer_from=_bpe_folder(tmp_path / "tok"))
    names = {tensor.name for tensor in gguf.GGUFReader(path).tensors}
    assert {"blk.2.attn_qkv.weight", "blk.2.ffn_up.weight"} <= names and "blk.3.attn_qkv.weight" not in names
    assert _fields(path)["phi3.attention.sliding_window"] == 0  # none (llama.cpp: 0 for none, as its converter writes)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_phi3_longrope_and_sliding_window_are_written_as_llama_cpp_reads_them(tmp_path):
    """Phi-3's long-context RoPE goes into the file as llama.cpp's converter writes it: the long and short factors
    as tensors, the original context length, the attention factor (the one transformers computes), the sliding
    window. Transformers' GGUF loader reads none of these back (it builds plain RoPE, no window): what is checked
    of the round trip here is the weights; the RoPE entries are checked in the file."""
    from test_phi3 import longrope

    model = tiny_model(TinySpec("phi3", 8, 2, 2, 8, 64, num_layers=3, dtype=torch.float32), **longrope(8))
    rope = model.config.rope_parameters
    path = export_gguf(model, tmp_path / "long.gguf", outtype="f16", tokenizer_from=_bpe_folder(tmp_path / "tok"))
    fields, tensors = _fields(path), {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert fields["phi3.rope.scaling.original_context_length"] == 32 and fields["phi3.context_length"] == 128
    assert fields["phi3.attention.sliding_window"] == 5 and fields["phi3.rope.dimension_count"] == 4  # half of 8
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(model.model.rotary_emb.attention_scaling)
    for name, key in (("rope_factors_long.weight", "long_factor"), ("rope_factors_short.weight", "short_factor")):
        assert np.array_equal(tensors[name].data, np.asarray(rope[key], dtype=np.float32)), name
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    loaded = back.state_dict()
    for name, weight in model.state_dict().items():
        assert torch.equal(loaded[name], _rounded(weight, "f16")), name


def test_a_head_dim_other_than_hidden_over_heads_is_written(tmp_path):
    """Qwen3's head_dim (8 here, hidden 24 over 4 heads is 6) goes into attention.key_length/value_length, where
    llama.cpp reads it. Transformers' GGUF loader does not read it for Qwen3 (it takes Qwen3Config's 128), so the
    round trip is checked with head_dim 128 above and the file's entries here."""
    model = tiny_model(TinySpec("qwen3", 6, 2, 2, 8, 64, num_layers=3, dtype=torch.float32))
    path = export_gguf(model, tmp_path / "q.gguf", outtype="f32", tokenizer_from=_bpe_folder(tmp_path / "tok"))
    fields = _fields(path)
    assert (fields["qwen3.attention.key_length"], fields["qwen3.attention.value_length"]) == (8, 8)
    assert fields["qwen3.embedding_length"] == 24 and fields["qwen3.rope.dimension_count"] == 8
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert np.array_equal(tensors["blk.1.attn_q_norm.weight"].data,
                          model.model.layers[1].self_attn.q_norm.weight.detach().numpy())


def test_a_gemma3_whose_global_layers_moved_or_whose_attention_scale_differs_is_refused(tmp_path):
    """llama.cpp's Gemma 3 graph makes every 6th layer global whatever the file says: a model whose global layers
    moved when blocks were removed, or whose query_pre_attn_scalar is not head_dim, would compute otherwise."""
    spec = TinySpec("gemma3_text", hidden_multiple=8, num_kv_heads=2, group_size=2, head_dim=256, intermediate_size=64,
                    num_layers=7, dtype=torch.float32)
    model, tokenizer = tiny_model(spec), _bpe_folder(tmp_path / "tok")
    assert model.config.layer_types[5] == "full_attention"  # the pattern: blocks 0-4 and 6 sliding-window
    export_gguf(model, tmp_path / "pattern.gguf", tokenizer_from=tokenizer)
    remove_blocks(model, [2], architecture_for(model))  # the global block 5 is now block 4
    with pytest.raises(ValueError, match=r"every 6th layer global .*differ at blocks 4, 5 "):
        export_gguf(model, tmp_path / "moved.gguf", tokenizer_from=tokenizer)
    with pytest.raises(ValueError, match=r"1/sqrt\(head_dim\) = 1/sqrt\(256\); this model's query_pre_attn_scalar is 64"):
        export_gguf(tiny_model(spec, query_pre_attn_scalar=64), tmp_path / "scaled.gguf", tokenizer_from=tokenizer)
    assert not (tmp_path / "moved.gguf").exists() and not (tmp_path / "scaled.gguf").exists()


def test_a_family_without_a_llama_cpp_counterpart_is_refused_with_those_that_export(tmp_path):
    model = tiny_model(TinySpec("olmo2", 2, 2, 2, 4, 20, num_layers=2, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"architecture 'olmo2' declares none \(Architecture.gguf\); the families "
                                         r"that export: " + re.escape(", ".join(exportable())) + "$"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer_from=_bpe_folder(tmp_path / "tok"))
    assert not list(tmp_path.glob("*.gguf*"))


def test_a_counterpart_is_one_field_of_the_registration(tmp_path):
    """Naming OLMo 2's llama.cpp counterpart is all GGUF export needs of it: every tensor (its norms after the
    sub-layers, its q/k norms) finds its llama.cpp name. Transformers' GGUF loader does not read OLMo 2, so the
    file is checked, not a round trip; nor is OLMo 2 registered with it outside this test."""
    olmo2 = ARCHITECTURES.get("olmo2")
    register_architecture(replace(olmo2, gguf=Gguf("olmo2")), replace=True)
    try:
        model = tiny_model(TinySpec("olmo2", 2, 2, 2, 4, 20, num_layers=2, dtype=torch.float32))
        path = export_gguf(model, tmp_path / "o.gguf", outtype="f32", tokenizer_from=_bpe_folder(tmp_path / "tok"))
    finally:
        register_architecture(olmo2, replace=True)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert {"blk.1.post_attention_norm.weight", "blk.1.post_ffw_norm.weight", "blk.1.attn_q_norm.weight"} <= set(tensors)
    assert len(tensors) == len(model.state_dict())
    assert np.array_equal(tensors["blk.1.attn_q.weight"].data, model.model.layers[1].self_attn.q_proj.weight.detach().numpy())


def test_gguf_counterparts_the_code_cannot_honour_are_refused():
    with pytest.raises(ValueError, match=r"declares rotary 'interleaved'; known: 'halves'"):
        Gguf("llama", rotary="interleaved")
    with pytest.raises(ValueError, match=r"declares gguf='llama'; give a flatten.models.architectures.Gguf"):
        Architecture("somefamily", gguf="llama")


def test_export_refuses_what_it_cannot_write(tmp_path):
    model = tiny_model(TinySpec("llama", 8, 2, 2, 8, 64, dtype=torch.float32))
    with pytest.raises(ValueError, match="outtype must be one of f32, f16, q8_0"):
        export_gguf(model, tmp_path / "x.gguf", outtype="q4", tokenizer_from=tmp_path)
    with pytest.raises(ValueError, match="no byte-level BPE tokenizer.json"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer_from=tmp_path)
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written


@pytest.mark.slow
def test_compressed_smollm2_exports_and_loads_back_with_its_tokenizer(tmp_path, capsys):
    out, path = tmp_path / "smol", tmp_path / "smol.gguf"
    code = main(["compress", "smollm2-135m", "--remove", "2", "--samples", "4", "--seq-len", "64", "--no-eval",
                 "--no-latency", "--quiet", "--out", str(out), "--gguf", str(path), "--outtype", "f32"])
    assert code == 0, capsys.readouterr().err
    assert tokenizer_source(out) == embedded_model_path()  # the GGUF it came from
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert back.config.num_hidden_layers == 28
    text = "The capital of France is Paris, and the capital of Italy is"
    ids = AutoTokenizer.from_pretrained(out)(text, return_tensors="pt")["input_ids"]
    assert torch.equal(AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)(text, return_tensors="pt")["input_ids"], ids)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, saved(ids).logits, rtol=0, atol=1e-4)
    assert json.loads((out / "flatten_run.json").read_text())["results"]["layers"] == [30, 28]
    assert main(["export", str(out), "--gguf", str(path), "--outtype", "q8_0"]) == 2  # exists: not replaced
    assert "already exists" in capsys.readouterr().err
    written = path.stat().st_mtime_ns
    assert main(["reproduce", str(out)]) == 0 and path.stat().st_mtime_ns == written  # re-run beside, not over it
    assert np.isfinite(gguf.GGUFReader(path).tensors[0].data).all()


@pytest.mark.slow
def test_llama_cpp_runs_the_exported_compressed_smollm2(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (optional; builds llama.cpp from source)")
    from flatten import Flattener, calibration_tokens, load_model

    model, tokenizer = load_model("smollm2-135m")
    model, _ = Flattener(model, calibration_tokens(tokenizer, samples=4, seq_len=64), progress=False).compress(remove=2)
    path = export_gguf(model, tmp_path / "smol.gguf", outtype="f32", tokenizer_from=embedded_model_path())
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    text = "The capital of France is Paris, and the capital of Italy is"
    ids = tokenizer(text)["input_ids"]
    assert llm.metadata["llama.block_count"] == "28" and llm.tokenize(text.encode(), add_bos=False) == ids
    llm.eval(ids)
    got = torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)
