"""The ``flatten`` command: every subcommand, on a tiny model with a word-level tokenizer, and the main job's
command on the real SmolLM2-135M."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from flatten.run.cli import build_parser, main

FAST = ["--samples", "2", "--seq-len", "16", "--batch-size", "2"]
FAST_EVAL = ["--windows", "2", "--ppl-len", "16"]
FAST_LATENCY = ["--prompt", "8", "--new-tokens", "2", "--repeats", "1"]


def _args(tiny, *extra):
    model, text = tiny
    return [str(model), *extra, "--calib", str(text)]


def test_every_subcommand_has_help(capsys):
    for command in ("compress", "plan", "eval", "bench"):
        with pytest.raises(SystemExit) as exit:
            build_parser().parse_args([command, "--help"])
        assert exit.value.code == 0
        assert f"flatten {command}" in capsys.readouterr().out


def test_compress_writes_a_stock_checkpoint_with_its_report(tiny, tmp_path, capsys):
    out = tmp_path / "small"
    code = main(["compress", *_args(tiny, "--remove", "2", "--out", str(out), "--quiet", "--ppl", str(tiny[1]),
                                     *FAST, *FAST_EVAL, *FAST_LATENCY)])
    printed = capsys.readouterr().out
    assert code == 0
    for row in ("layers", "parameters", "perplexity", "prefill ms", "decode ms/token", "Compression:"):
        assert row in printed
    assert {"config.json", "model.safetensors", "tokenizer.json", "plan.json", "README.md", "flatten_run.json",
            "cut.png"} <= {p.name for p in out.iterdir()}
    assert (out / "cut.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "flatten_run.json").read_text())
    assert record["results"]["layers"] == [5, 3]
    assert record["results"]["latency_ratios"][0]["decode"]["pairs"] == 1 and "not resolved" in printed  # 1 pair
    assert record["calibration"]["samples"] == 2 and len(record["calibration"]["sha256"]) == 64
    assert "3 decoder blocks" in (out / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == len(reloaded.model.layers) == 3


def test_compress_refuses_an_existing_output_and_leaves_it_alone(tiny, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code = main(["compress", *_args(tiny, "--remove", "1", "--out", str(out), "--no-eval", "--no-latency", *FAST)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("extra, says", [
    (["--fraction", "1.5"], "--fraction"),
    (["--remove", "5"], "cannot remove 5 of 5 blocks"),
    (["--remove", "0"], "cannot remove 0"),
    (["--policy", "fixed"], "needs its option spans"),
    (["--policy", "fixed", "--spans", "1-x"], "spans must look like"),
    (["--scorer", "nonsense"], "unknown scorer 'nonsense'; known:"),
    (["--device", "tpu:7"], "unknown device"),
    (["--strategy", "shortgpt", "--scorer", "magnitude"], "shortgpt has no option 'scorer'"),
    (["--method", "sleb:search_samples=many"], "search_samples='many': expected int"),
    (["--spans", "1-2"], "policy 'cut' has no option 'spans'"),
    (["--strategy", "dropout"], "unknown strategy 'dropout'"),
    (["--samples", "1000"], "windows"),
])
def test_compress_bad_input_gets_a_clear_error(tiny, tmp_path, capsys, extra, says):
    out = tmp_path / "never"
    code = main(["compress", *_args(tiny, "--out", str(out), "--no-eval", "--no-latency", *FAST, *extra)])
    assert code == 2 and says in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_compress_with_fixed_spans(tiny, tmp_path, monkeypatch):
    out = tmp_path / "fixed"
    tuned = []  # --dtype auto tunes glibc for the rest of the process: not in the test process
    monkeypatch.setattr("flatten.run.cli.map_large_allocations", lambda: tuned.append(True))
    code = main(["compress", *_args(tiny, "--policy", "fixed", "--spans", "1-3", "--out", str(out), "--quiet",
                                     "--dtype", "auto", "--one-block-fallback", "loss", "--token-weighting", "input-rms",
                                     "--no-eval", "--no-latency", *FAST)])
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["merges"][-1]["span"] == [1, 3]
    assert plan["method"]["token_weighting"] == "input-rms" and plan["method"]["one_block_fallback"] == "loss"
    assert len(plan["method"]["merge_choices"]) == 2
    assert tuned == [True]
    what = json.loads((out / "flatten_run.json").read_text())["what"]
    kept = [choice["chosen"] for choice in plan["method"]["merge_choices"]]
    assert ("flattened spans 1-3" in what) == (kept[-1] == "merged")  # else it names the blocks it dropped


def test_map_large_allocations_tunes_glibc():
    code = "from flatten.models.loading import map_large_allocations; print(map_large_allocations())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == ("True" if platform.libc_ver()[0] == "glibc" else "False")


def test_compress_with_a_baseline_strategy(tiny, tmp_path, capsys):
    out = tmp_path / "short"
    code = main(["compress", *_args(tiny, "--strategy", "shortgpt", "--remove", "2", "--out", str(out), "--quiet",
                                     "--ppl", str(tiny[1]), *FAST, *FAST_EVAL, "--no-latency")])
    assert code == 0 and "ShortGPT" in capsys.readouterr().out
    removal = json.loads((out / "removal.json").read_text())
    assert len(removal["removed"]) == 2 and removal["method"]["strategy"] == "shortgpt"
    assert not (out / "similarity.png").exists() and "ShortGPT" in (out / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


def test_the_default_output_folder_is_named_after_the_method(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folder is out/<model>-<method> under the working directory
    code = main(["compress", *_args(tiny, "--strategy", "shortgpt", "--remove", "2", "--quiet", *FAST,
                                     "--no-eval", "--no-latency")])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{Path(tiny[0]).name}-shortgpt"]


def test_compress_prune_only_takes_a_scorer(tiny, tmp_path, capsys):
    out = tmp_path / "narrow"
    code = main(["compress", *_args(tiny, "--strategy", "prune-only", "--scorer", "magnitude", "--remove", "1",
                                     "--out", str(out), "--quiet", "--no-eval", "--no-latency", *FAST)])
    assert code == 0 and "pruned the MLP of every block" in capsys.readouterr().out
    removal = json.loads((out / "removal.json").read_text())
    assert removal["method"]["scorer"] == "magnitude" and removal["removed"] == []
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert config.num_hidden_layers == 5 and config.intermediate_size == removal["mlp_width"][1]


def test_plan_is_a_dry_run(tiny, tmp_path, capsys):
    model = tiny[0]
    before = (model / "model.safetensors").read_bytes()
    code = main(["plan", *_args(tiny, "--remove", "2", *FAST), "--json", str(tmp_path / "plan.json"),
                 "--png", str(tmp_path / "plan.png")])
    printed = capsys.readouterr().out
    assert code == 0 and "spans to flatten" in printed and "blocks: 5 -> 3" in printed
    document = json.loads((tmp_path / "plan.json").read_text())
    assert len(document["similarity"]) == 5
    assert sum(c - a for a, c in document["spans"]) == 2
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    assert (model / "model.safetensors").read_bytes() == before


def test_eval_reports_perplexity(tiny, tmp_path, capsys):
    code = main(["eval", str(tiny[0]), "--ppl", str(tiny[1]), *FAST_EVAL, "--json", str(tmp_path / "eval.json")])
    assert code == 0 and "perplexity" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["layers"] == 5 and result["perplexity"][0]["windows"] == 2
    assert 1 < result["perplexity"][0]["value"] < float("inf")
    code = main(["eval", str(tiny[0]), "--ppl", f"{tiny[1]},{tiny[1]}", *FAST_EVAL, "--json", str(tmp_path / "two.json")])
    assert code == 0 and len(json.loads((tmp_path / "two.json").read_text())["perplexity"]) == 2


def test_the_cli_module_runs_as_a_script():
    done = subprocess.run([sys.executable, "-m", "flatten.run.cli", "eval", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "flatten eval" in done.stdout


def test_bench_compares_two_models(tiny, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["compress", *_args(tiny, "--remove", "2", "--out", str(out), "--quiet", "--no-eval", "--no-latency",
                                    *FAST)]) == 0
    code = main(["bench", str(out), "--against", str(tiny[0]), "--batch", "1,2", *FAST_LATENCY])
    printed = capsys.readouterr().out
    assert code == 0 and "decode speed-up" in printed and "layer-count ratio" in printed
    rows = [line for line in printed.splitlines() if line.startswith(f"| {out} ") or line.startswith(f"| {tiny[0]} ")]
    assert len(rows) == 4  # two models, two batch sizes
    assert "not resolved" in printed  # one pair of runs cannot tell


def test_bench_bad_batch_list(tiny, capsys):
    assert main(["bench", str(tiny[0]), "--batch", "1,zero"]) == 2
    assert "--batch must be" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_compresses_smollm2_into_a_checkpoint_that_reloads_and_generates(tmp_path):
    """The main job's command (shortened), run as a user would, and its checkpoint loaded in a fresh process."""
    flatten = Path(sys.executable).with_name("flatten")
    out = tmp_path / "smollm2-28"
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([str(flatten), "compress", "smollm2-135m", "--remove", "2", "--samples", "4", "--seq-len",
                          "128", "--windows", "4", "--ppl-len", "128", "--repeats", "1", "--new-tokens", "4",
                          "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| layers" in run.stdout and "30 |" in run.stdout and "28 |" in run.stdout
    load = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "ids = t('The capital of France is', return_tensors='pt')\n"
            "out = m.generate(**ids, max_new_tokens=8, do_sample=False)\n"
            "print(m.config.num_hidden_layers, len(m.model.layers), repr(t.decode(out[0, ids['input_ids'].shape[1]:])))")
    loaded = subprocess.run([sys.executable, "-c", load, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    layers, blocks, text = loaded.stdout.split(" ", 2)
    assert layers == blocks == "28" and len(text.strip("'\" \n")) > 0


def test_eval_zero_shot_through_lm_eval(tiny, tmp_path, capsys):
    code = main(["eval", str(tiny[0]), "--no-ppl", "--tasks", "piqa,arc_easy", "--limit", "3",
                 "--json", str(tmp_path / "eval.json")])
    assert code == 0 and "zero-shot mean" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())["zero_shot"]
    assert [s["task"] for s in result["scores"]] == ["piqa", "arc_easy"]
    assert [s["metric"] for s in result["scores"]] == ["acc_norm", "acc_norm"]
    assert all(s["items"] == 3 and 0 <= s["value"] <= 1 for s in result["scores"])
    assert result["limit"] == 3 and result["lm_eval_version"].startswith("0.4")


def test_eval_refuses_unknown_tasks_before_loading(capsys):
    assert main(["eval", "no/such-model", "--tasks", "piqa,mmlu"]) == 2
    assert "unknown zero-shot tasks ['mmlu']; known: piqa" in capsys.readouterr().err


def test_an_output_under_a_regular_file_is_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    for command in (["compress", "no/such-model", "--out", str(tmp_path / "file" / "out")],
                    ["compress", "no/such-model", "--out", str(tmp_path / "x"), "--gguf", str(tmp_path / "file" / "m.gguf")],
                    ["export", "no/such-model", "--gguf", str(tmp_path / "file" / "m.gguf")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "is a file, not a folder" in err and "loading" not in err
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("extra, says", [
    (["--remove", "0"], "cannot remove 0 of 5 blocks"),
    (["--remove", "5"], "cannot remove 5 of 5 blocks"),
    (["--ratio", "1.5"], "--ratio must be a fraction"),
    (["--scorer", "nonsense"], "unknown scorer 'nonsense'"),
    (["--calib", "EMPTY"], "holds no text"),
])
def test_what_needs_no_weights_is_refused_before_they_load(tiny, tmp_path, capsys, extra, says):
    (tmp_path / "empty.txt").write_text("\n\n")
    extra = [str(tmp_path / "empty.txt") if e == "EMPTY" else e for e in extra]
    assert main(["compress", str(tiny[0]), "--calib", str(tiny[1]), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and "loading" not in err
