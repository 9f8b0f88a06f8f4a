"""Models dispatched by accelerate (a ``device_map`` with blocks offloaded to disk behind hooks, weights on the
meta device) compress as they are: the same weights as the model loaded whole, blocks the strategy leaves
alone still on disk, a stock checkpoint that reloads, ``generate()`` with a KV cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from flatten import build_strategy, save_checkpoint
from flatten.models.dispatch import weights_of
from flatten.models.loading import embedded_model_path
from flatten.run.cli import main
from tiny import TinySpec, tiny_model

STRATEGIES = ["cut-absorb", "cut-merge", "flattengpt", "replaceme", "angular", "shortgpt", "sleb", "laco",
              "blockpruner", "prune-only"]


def _dispatched(folder, layers: int, resident: int):
    """The checkpoint in ``folder`` with blocks ``resident`` and up offloaded to disk."""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" if i < resident else "disk" for i in range(layers)})
    return AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=folder / "offload",
                                                dtype=torch.float32).eval()


def _offloaded(block) -> bool:
    return any(t.is_meta for t in block.parameters())


def _check_same_compression(folder, method, calibration, remove, resident, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    originals = [{k: t.clone() for k, t in weights_of(block).items()} for block in plain.model.layers]
    layers = len(originals)
    expected, _ = build_strategy(method, plain, calibration, progress=False).compress(remove=remove)
    got, _ = build_strategy(method, _dispatched(folder, layers, resident), calibration,
                            progress=False).compress(remove=remove)

    blocks = got.model.layers
    assert sorted(k for k in got.hf_device_map if k.startswith("model.layers.")) == \
        sorted(f"model.layers.{i}" for i in range(len(blocks)))
    for i, block in enumerate(blocks):  # a block kept as it was stays where it was, on disk or in memory
        weights = weights_of(block)
        source = next((j for j, o in enumerate(originals) if o.keys() == weights.keys()
                       and all(torch.equal(o[k], weights[k]) for k in o)), None)
        if source is not None:
            assert _offloaded(block) == (source >= resident), (i, source)
        assert got.hf_device_map[f"model.layers.{i}"] == ("disk" if _offloaded(block) else "cpu")

    save_checkpoint(got, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    want = expected.state_dict()
    assert back.state_dict().keys() == want.keys()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    return got, expected


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("method", STRATEGIES)
def test_dispatched_tiny_model_compresses_to_the_weights_of_the_whole_one(tmp_path, model_type, method):
    spec = TinySpec(model_type, hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=8, intermediate_size=24,
                    num_layers=6, dtype=torch.float32, bias=model_type == "qwen2")
    tiny_model(spec).save_pretrained(tmp_path / "model")
    calibration = torch.randint(0, 61, (8, 16), generator=torch.Generator().manual_seed(0))
    got, expected = _check_same_compression(tmp_path / "model", method, calibration, 2, 2, tmp_path)
    ids = calibration[:2, :5]
    with torch.no_grad():
        assert torch.equal(got.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True),
                           expected.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True))


def test_blocks_offloaded_as_one_list_get_a_device_map_entry_each(tmp_path):
    spec = TinySpec("qwen2", hidden_multiple=2, num_kv_heads=1, group_size=2, head_dim=8, intermediate_size=16,
                    num_layers=5, dtype=torch.float32, bias=True)
    tiny_model(spec).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, offload_folder=tmp_path / "offload",
                                                 device_map={"model.embed_tokens": "cpu", "model.layers": "disk",
                                                             "model.norm": "cpu", "model.rotary_emb": "cpu",
                                                             "lm_head": "cpu"})
    calibration = torch.randint(0, 61, (4, 12), generator=torch.Generator().manual_seed(1))
    got, _ = build_strategy("cut-absorb", model, calibration, progress=False).compress(remove=2)
    blocks = {k: v for k, v in got.hf_device_map.items() if k.startswith("model.layers")}
    assert list(blocks) == [f"model.layers.{i}" for i in range(3)]
    assert list(blocks.values()) == ["disk" if _offloaded(b) else "cpu" for b in got.model.layers]


def test_compress_command_offloads_what_does_not_fit(tiny, tmp_path, capsys):
    model, text = tiny
    out = tmp_path / "out"
    assert main(["compress", str(model), "--device-map", "auto", "--max-memory", "cpu=12KB", "--offload-folder",
                 str(tmp_path / "offload"), "--remove", "2", "--calib", str(text), "--samples", "4", "--seq-len", "16",
                 "--out", str(out), "--quiet"]) == 0
    assert "device map: blocks 1 on cpu, 4 on disk" in capsys.readouterr().err
    expected = tmp_path / "expected"
    assert main(["compress", str(model), "--remove", "2", "--calib", str(text), "--samples", "4", "--seq-len", "16",
                 "--out", str(expected), "--quiet", "--no-latency"]) == 0
    got, want = (AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).state_dict() for f in (out, expected))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("flags, message", [
    (["--max-memory", "cpu=1GiB"], "--max-memory and --offload-folder go with --device-map"),
    (["--device-map", "auto", "--max-memory", "cpu"], "--max-memory takes DEVICE=SIZE"),
])
def test_dispatch_flags_are_checked_before_loading(tiny, tmp_path, capsys, flags, message):
    model, text = tiny
    assert main(["compress", str(model), "--remove", "2", "--calib", str(text), "--out", str(tmp_path / "o"),
                 *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_with_most_blocks_on_disk_compresses_like_the_whole_model(tmp_path):
    from flatten.data import calibration_tokens
    from flatten.models.loading import load_model

    model, tokenizer = load_model(embedded_model_path())
    save_checkpoint(model, tmp_path / "smollm2", tokenizer)
    del model
    calibration = calibration_tokens(tokenizer, samples=4, seq_len=64)
    got, _ = _check_same_compression(tmp_path / "smollm2", "cut-absorb", calibration, 6, 4, tmp_path)
    assert sum(_offloaded(block) for block in got.model.layers) >= 18  # only the blocks it changed came in
