"""LoRA recovery, run records and ``flatten reproduce``; determinism on CPU."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flatten import Flattener, recover
from flatten.run.cli import main
from tiny import TinySpec, tiny_model

SPEC = TinySpec("qwen2", hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=4, intermediate_size=12,
                num_layers=4, bias=True, dtype=torch.float32)


def _tokens(samples=8, length=12, seed=0):
    return torch.randint(0, 61, (samples, length), generator=torch.Generator().manual_seed(seed))


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_recovery_lowers_the_loss_and_leaves_a_stock_model_bit_identically_on_cpu():
    model = tiny_model(SPEC)
    data = _tokens()
    runs = [recover(copy.deepcopy(model), data, epochs=3, batch_size=2, lr=5e-3, progress=False) for _ in range(2)]
    (tuned, record), (again, _) = runs
    assert type(tuned) is type(model) and not any("lora" in name for name, _ in tuned.named_parameters())
    assert tuned.state_dict().keys() == model.state_dict().keys()
    assert _same(tuned, again)  # same inputs and seed: the same weights
    assert not _same(tuned, model)
    assert len(record.losses) == 3 * 4 and record.trainable_parameters > 0
    assert sum(record.losses[-4:]) < sum(record.losses[:4])  # the last epoch fits the data better than the first
    with torch.no_grad():
        assert tuned.generate(data[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize("kwargs, says", [({"rank": 0}, "rank must be an int >= 1"),
                                          ({"epochs": 1.5}, "epochs must be an int >= 1"),
                                          ({"lr": -1.0}, "lr must be a positive number")])
def test_bad_recovery_settings(kwargs, says):
    with pytest.raises(ValueError, match=says):
        recover(tiny_model(SPEC), _tokens(), progress=False, **kwargs)
    with pytest.raises(ValueError, match="another tokenizer"):
        recover(tiny_model(SPEC), torch.full((2, 8), 99), progress=False)


def test_compression_on_cpu_is_deterministic():
    model, calibration = tiny_model(SPEC), _tokens(6, 10)
    first, _ = Flattener(copy.deepcopy(model), calibration, progress=False).compress(remove=2)
    second, _ = Flattener(copy.deepcopy(model), calibration, progress=False).compress(remove=2)
    assert _same(first, second)


def test_saved_runs_carry_their_record_and_reproduce_bit_identically(tiny, tmp_path, capsys):
    model, text = tiny
    compressed, recovered = tmp_path / "compressed", tmp_path / "recovered"
    assert main(["compress", str(model), "--remove", "2", "--calib", str(text), "--samples", "4", "--seq-len", "16",
                 "--batch-size", "2", "--out", str(compressed), "--windows", "2", "--ppl-len", "16", "--ppl", str(text),
                 "--no-latency", "--quiet"]) == 0
    assert main(["recover", str(compressed), "--data", str(text), "--samples", "8", "--seq-len", "16", "--epochs", "1",
                 "--batch-size", "4", "--out", str(recovered), "--windows", "2", "--ppl-len", "16", "--ppl", str(text),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "LoRA recovery (rank 8, 1 epochs, 2 steps" in printed and "perplexity" in printed

    record = json.loads((compressed / "flatten_run.json").read_text())
    assert record["argv"][0] == "compress" and len(record["source_sha256"]) == 64
    assert {"source", "samples", "seq_len", "seed", "sha256"} <= record["calibration"].keys()
    assert {"scorer", "policy", "calibration", "remove"} <= record["method"].keys() and record["versions"]["torch"]
    recovery = json.loads((recovered / "flatten_run.json").read_text())["recovery"]
    assert recovery["argv"][0] == "recover" and recovery["rank"] == 8 and len(recovery["losses"]) == 2
    assert recovery["perplexity"][0]["value"] > 0 and (recovered / "plan.json").is_file()

    for folder in (compressed, recovered):
        assert main(["reproduce", str(folder)]) == 0
        assert "bit-identical" in capsys.readouterr().out

    weights = load_file(compressed / "model.safetensors")
    name = next(iter(sorted(weights)))
    weights[name] = weights[name] + 1e-3
    save_file(weights, compressed / "model.safetensors", metadata={"format": "pt"})
    assert main(["reproduce", str(compressed)]) == 1
    assert f"NOT reproduced: 1 of {len(weights)} tensors differ, e.g. {name}" in capsys.readouterr().out
