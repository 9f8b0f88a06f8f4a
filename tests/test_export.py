"""GGUF export: the file loads back through transformers' GGUF loader with the weights rounded as its tensor
type says and the same logits; the real SmolLM2 also with the same tokenizer."""

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from flatten.cli import main
from flatten.export import export_gguf, tokenizer_source
from flatten.models import embedded_model_path
from tiny import TinySpec, tiny_model


def _bpe_folder(folder):
    """A byte-level BPE tokenizer of the tiny models' 61 tokens (what export_gguf reads from a folder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(60)}}
    backend = Tokenizer(models.BPE(vocab, merges=[], unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(folder)
    return folder


def _rounded(weight: torch.Tensor, outtype: str) -> torch.Tensor:
    """``weight`` as the GGUF file stores it, back in float32."""
    if outtype == "f32" or weight.ndim == 1:
        return weight
    if outtype == "q8_0" and weight.shape[-1] % 32 == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), kind), kind).copy())
    return weight.half().float()


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_tiny_models_round_trip_through_transformers_gguf_loader(tmp_path, model_type, outtype):
    spec = TinySpec(model_type, hidden_multiple=8, num_kv_heads=2, group_size=2, head_dim=8, intermediate_size=64,
                    num_layers=3, dtype=torch.float32, bias=model_type == "qwen2")
    model = tiny_model(spec)
    path = export_gguf(model, tmp_path / "tiny.gguf", outtype=outtype, tokenizer_from=_bpe_folder(tmp_path / "tok"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert back.config.num_hidden_layers == 3 and back.config.num_key_value_heads == 2
    loaded = back.state_dict()
    for name, weight in model.state_dict().items():
        assert torch.equal(loaded[name], _rounded(weight, outtype)), name
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits if outtype == "f32" else None
        got = back(ids).logits
    if expected is not None:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()


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
