"""The compress -> measure -> report pipeline as a library object: what ``flatten compress`` runs."""

import json

import pytest

from flatten.run.cli import main
from safetensors.torch import load_file
from flatten.run.pipeline import Amount, Calibration, CompressJob, PerplexityTexts, compress_timed, load
from flatten.strategies.options import Method


def test_the_job_writes_what_the_command_writes(tiny, tmp_path, capsys):
    model, text = tiny
    job = CompressJob(str(model), Method.parse("cut-absorb"), out=tmp_path / "job", amount=Amount(remove=2),
                      calibration=Calibration(str(text), samples=2, seq_len=16),
                      texts=PerplexityTexts((str(text),), windows=2, seq_len=16), latency=None, batch_size=2,
                      progress=False, log=lambda message: None)
    report = job.run()
    assert report.record.results.layers == [5, 3] and len(report.record.results.perplexity) == 1
    before, after = report.record.results.perplexity[0]
    assert before["windows"] == after["windows"] == 2 and before["text"] == after["text"]
    assert main(["compress", str(model), "--remove", "2", "--calib", str(text), "--samples", "2", "--seq-len", "16",
                 "--batch-size", "2", "--ppl", str(text), "--windows", "2", "--ppl-len", "16", "--no-latency",
                 "--quiet", "--out", str(tmp_path / "command")]) == 0
    capsys.readouterr()
    job_weights, command_weights = (load_file(tmp_path / name / "model.safetensors") for name in ("job", "command"))
    assert job_weights.keys() == command_weights.keys()
    assert all(job_weights[k].equal(command_weights[k]) for k in job_weights)
    saved = json.loads((tmp_path / "job" / "flatten_run.json").read_text())
    assert saved["results"]["perplexity"] == json.loads((tmp_path / "command" / "flatten_run.json").read_text())[
        "results"]["perplexity"]


def test_the_job_refuses_before_loading(tiny, tmp_path):
    model, text = tiny
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        CompressJob(str(model), Method.parse("cut-absorb"), out=tmp_path / "taken").run()
    with pytest.raises(ValueError, match="from 1 to 4"):
        CompressJob(str(model), Method.parse("cut-absorb"), out=tmp_path / "a", amount=Amount(remove=5)).run()
    with pytest.raises(ValueError, match="one of remove, ratio and fraction"):
        Amount(remove=1, fraction=0.2).check(str(model))
    with pytest.raises(ValueError, match="no option .nonsense."):
        CompressJob(str(model), Method.parse("cut-absorb:nonsense=1"), out=tmp_path / "b").run()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_compress_timed_and_amount_on_a_loaded_model(tiny):
    model, text = tiny
    loaded, tokenizer = load(str(model), log=lambda message: None)
    ids, about = Calibration(str(text), samples=2, seq_len=16).tokens(tokenizer)
    assert ids.shape == (2, 16) and about["samples"] == 2 and len(about["sha256"]) == 64
    compressor = Method.parse("shortgpt").build(loaded, ids, progress=False)
    assert Amount(fraction=0.4).blocks(compressor) == 2 and Amount(remove=1).blocks(compressor) == 1
    done = compress_timed(compressor, 2)
    assert len(done.model.model.layers) == 3 and done.seconds > 0
    assert done.peak_memory_bytes >= done.baseline_memory_bytes > 0
