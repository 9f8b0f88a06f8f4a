"""Results as data: benchmarks/render_results.py turns compare.py's JSON files into RESULTS.md's tables."""

import json
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import render_results  # noqa: E402  (benchmarks/ is no package)


def _row(method, ppl, calibration="default", remove=6, layers=24, **extra):
    return {"method": method, "calibration": calibration, "remove": remove, "calibration_samples": 32,
            "layers": layers, "parameters": 100_000_000 + layers, "perplexity": ppl, "compress_seconds": 12.5,
            "compress_forward_ratio": 2.25, "peak_memory_bytes": 3 * 2**30, "cuda_peak_bytes": None,
            "what": f"removed blocks | of {method}", "record": {"strategy": method.split(":")[0]}, **extra}


def _ppl(lv, verse, wiki, alice):
    return {"wikipedia-leads-validation": lv, "paradise-lost": verse, "wikitext2": wiki, "alice": alice}


def _result():
    shot = {"mean": 0.5, "mean_stderr": 0.01, "lm_eval_version": "0.4.13", "limit": 20,
            "scores": [{"task": "piqa", "metric": "acc_norm", "value": 0.6, "stderr": 0.02, "items": 20, "acc": 0.6,
                        "acc_norm": 0.6},
                       {"task": "arc_easy", "metric": "acc_norm", "value": 0.4, "stderr": 0.02, "items": 20,
                        "acc": 0.4, "acc_norm": 0.4}]}
    dense = _row("dense", _ppl(10.0, 30.0, 20.0, 15.0), calibration=None, remove=0, layers=30, zero_shot=shot)
    dense.update(compress_seconds=None, compress_forward_ratio=None, peak_memory_bytes=None, what="", record=None)
    return {
        "schema": 1, "complete": True, "title": "a fixture",
        "command": "python benchmarks/compare.py --model smollm2-135m --remove 6 --eval validation,test",
        "argv": ["benchmarks/compare.py"], "code": {"commit": "0123456789abcdef", "dirty": True},
        "date": "2026-12-03", "machine": "Linux x86_64, 2 CPUs, no GPU", "device": "cpu",
        "model": {"name": "smollm2-135m", "layers": 30, "parameters": 134_515_008}, "remove": [6],
        "calibrations": [{"name": "default", "description": "a mix", "domains": ["encyclopedic", "code"],
                          "samples": 32, "seq_len": 512, "seed": 0, "sha256": "ab" * 32}],
        "evaluation": {"metric": "perplexity", "windows": 32, "seq_len": 512, "protocol": "..."},
        "texts": [{"name": "wikitext2", "role": "test", "domain": "encyclopedic", "source": "s", "windows": 32},
                  {"name": "wikipedia-leads-validation", "role": "validation", "domain": "encyclopedic",
                   "source": "s", "windows": 32},
                  {"name": "alice", "role": "test", "domain": "fiction", "source": "s", "windows": 32},
                  {"name": "paradise-lost", "role": "validation", "domain": "verse", "source": "s", "windows": 20}],
        "forward_seconds": 5.5, "zero_shot": {"tasks": ["piqa", "arc_easy"], "limit": 20},
        "rows": [dense,
                 _row("flattengpt", _ppl(12.0, 40.0, 24.0, 18.0), zero_shot=shot),
                 _row("shortgpt", _ppl(15.0, 35.0, 30.0, 20.0)),
                 _row("sleb:search_samples=4", _ppl(13.0, 50.0, 25.0, 24.0))],
    }


@pytest.fixture
def workspace(tmp_path):
    """A copy of RESULTS.md and a results folder holding one JSON file."""
    lines = (BENCHMARKS / "RESULTS.md").read_text().split("\n")  # as it would be before its first rendering
    if render_results.BEGIN in lines:
        lines = lines[: lines.index(render_results.BEGIN)] + lines[lines.index(render_results.END) + 2 :]
    (tmp_path / "RESULTS.md").write_text("\n".join(lines))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "smollm2-135m_remove6_2026-12-03.json").write_text(json.dumps(_result()))
    (tmp_path / "results" / "README.md").write_text("not a result")
    return tmp_path


def _run(workspace, *extra) -> int:
    return render_results.main(["--results", str(workspace / "results"), "--out", str(workspace / "RESULTS.md"),
                                *extra])


def _cells(line: str) -> list[str]:
    """A table line's cells (an escaped pipe stays inside its cell)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _region(lines):
    return lines[lines.index(render_results.BEGIN) : lines.index(render_results.END) + 1]


def test_the_table_separates_validation_from_test_and_bolds_the_best(workspace):
    original = (workspace / "RESULTS.md").read_text()
    assert render_results.BEGIN not in original.split("\n")
    assert _run(workspace, "--check") == 1
    assert _run(workspace) == 0
    lines = (workspace / "RESULTS.md").read_text().split("\n")
    start, end = lines.index(render_results.BEGIN), lines.index(render_results.END)
    # every other line is untouched; the region sits at the top of the quality section, before its first table
    assert lines[:start] + lines[end + 2 :] == original.split("\n") and lines[end + 1] == ""
    heading = next(i for i, line in enumerate(lines) if line.startswith("## Quality"))
    assert heading < start and not any(line.startswith("#") for line in lines[heading + 1 : start])
    assert lines[end + 2].startswith("#")

    region = lines[start : end + 1]
    assert "### smollm2-135m: a fixture, 6 of 30 blocks removed (2026-12-03)" in region
    text = "\n".join(region)
    assert "`python benchmarks/compare.py --model smollm2-135m --remove 6 --eval validation,test`" in text
    assert "commit 0123456, with uncommitted changes" in text and "Machine: Linux x86_64, 2 CPUs, no GPU" in text
    assert "seed 0, token sha256 abababababab" in text and "paradise-lost 20" in text
    header = next(line for line in region if line.startswith("| calibrated on"))
    cells = _cells(header)
    assert cells[5:9] == ["val: wikipedia-leads-validation", "val: paradise-lost", "test: wikitext2", "test: alice"]
    assert cells[9:11] == ["piqa", "arc_easy"] and cells[-1] == "what it did"
    rows = {_cells(line)[1]: _cells(line) for line in region if line.startswith("| ") and line is not header}
    assert rows["dense"][5:9] == ["10.00", "30.00", "20.00", "15.00"]  # the dense model is never bold
    assert rows["flattengpt"][5:9] == ["**12.00**", "40.00", "**24.00**", "**18.00**"]
    assert rows["shortgpt"][5:9] == ["15.00", "**35.00**", "30.00", "20.00"]
    assert rows["flattengpt"][9:12] == ["0.600", "0.400", "0.500 +- 0.010"]
    assert rows["shortgpt"][9:12] == ["", "", ""]
    assert rows["sleb:search_samples=4"][-1] == "removed blocks \\| of sleb:search_samples=4"  # a pipe, escaped
    assert rows["flattengpt"][4] == "100,000,024" and rows["flattengpt"][-4:-1] == ["12.5", "2.2", "3.00"]
    # the last line: each method over the best baseline (shortgpt, sleb) per test text
    ratio = next(line for line in region if line.startswith("Ratio to the best baseline"))
    assert "(wikitext2 / alice;" in ratio and "best: wikitext2 sleb:search_samples=4, alice shortgpt" in ratio
    assert f"flattengpt {24 / 25:.3f} / {18 / 20:.3f}" in ratio
    assert f"shortgpt {30 / 25:.3f} / 1.000" in ratio and f"sleb:search_samples=4 1.000 / {24 / 20:.3f}" in ratio


def test_rendering_twice_gives_the_same_file_and_new_data_change_only_the_region(workspace):
    _run(workspace)
    once = (workspace / "RESULTS.md").read_text()
    assert _run(workspace) == 0 and (workspace / "RESULTS.md").read_text() == once
    assert _run(workspace, "--check") == 0

    second = _result()
    second.update(date="2026-12-04", title="another", complete=False, rows=second["rows"][:2])
    (workspace / "results" / "smollm2-135m_remove6_2026-12-04.json").write_text(json.dumps(second))
    _run(workspace)
    twice = (workspace / "RESULTS.md").read_text()
    before, after = once.split("\n"), twice.split("\n")
    assert before[: before.index(render_results.BEGIN)] == after[: after.index(render_results.BEGIN)]
    assert before[before.index(render_results.END) :] == after[after.index(render_results.END) :]
    region = "\n".join(_region(after))
    assert region.index("another, 6 of 30") < region.index("a fixture, 6 of 30")  # newest first
    assert "The run stopped after these 2 rows." in region
    assert "no baseline (shortgpt, sleb, laco, blockpruner, replaceme, angular) in this run" in region
    _run(workspace)
    assert (workspace / "RESULTS.md").read_text() == twice


def test_markers_out_of_order_are_refused():
    with pytest.raises(ValueError, match="in that order"):
        render_results.update(f"a\n{render_results.END}\n{render_results.BEGIN}\n", ["x"])
    with pytest.raises(ValueError, match="no section"):
        render_results.update("# Results\n\nnothing\n", ["x"])


def _write(workspace, day, **changes):
    result = {**_result(), "date": day, "title": f"run of {day}", **changes}
    (workspace / "results" / f"smollm2-135m_remove6_{day}.json").write_text(json.dumps(result))
    return result


def test_results_of_one_setup_are_pooled_newest_first_and_other_setups_are_not(workspace):
    """Rows of the same model, removal, calibration tokens, windows and dtype from several files go into one
    table, each method from the newest file that ran it; a text a newer row lacks comes from an older one."""
    rows = _result()["rows"]
    newer_flattengpt = dict(rows[1], perplexity={"wikitext2": 30.0, "alice": 21.0})  # test texts only
    laco = _row("laco", _ppl(100.0, 100.0, 90.0, 90.0))
    _write(workspace, "2026-12-04", rows=[rows[0], newer_flattengpt, laco])
    other_tokens = _result()["calibrations"][0] | {"sha256": "cd" * 32}
    _write(workspace, "2026-12-05", calibrations=[other_tokens])  # another setup: never pooled with these
    assert _run(workspace) == 0
    region = _region((workspace / "RESULTS.md").read_text().split("\n"))
    headings = [line for line in region if "every method at one setup" in line]
    assert headings == ["### smollm2-135m: every method at one setup, 6 of 30 blocks removed (pooled from 2 tables)"]
    start = region.index(headings[0])
    table = region[start : next(i for i in range(start + 4, len(region)) if not region[i].startswith("|"))]
    header = _cells(next(line for line in table if line.startswith("| method")))
    assert header == ["method", "from", "val: wikipedia-leads-validation", "val: paradise-lost",
                      "val: geometric mean", "test: wikitext2", "test: alice", "what it did"]
    cells = {_cells(line)[0]: _cells(line) for line in table if line.startswith("| ") and "---" not in line}
    assert list(cells)[2:] == ["flattengpt", "laco", "shortgpt", "sleb:search_samples=4"]  # ours, then baselines
    assert cells["flattengpt"][1:7] == ["2026-12-04, 2026-12-03", "**12.00**", "40.00", "**21.91**", "30.00",
                                        "21.00"]
    assert cells["shortgpt"][1] == "2026-12-03" and cells["shortgpt"][4] == f"{(15.0 * 35.0) ** 0.5:.2f}"
    assert cells["laco"][1] == "2026-12-04"
    ratio = next(line for line in region[start:] if line.startswith("Ratio to the best baseline"))
    assert f"flattengpt {30 / 25:.3f} / {21 / 20:.3f}" in ratio


def test_the_readme_gets_the_test_columns_of_the_pooled_float32_setup_of_most_methods(workspace):
    readme = workspace / "README.md"
    readme.write_text(f"# x\n\n{render_results.README_BEGIN}\nold\n{render_results.README_END}\n\nafter\n")
    rows = _result()["rows"]
    variants = [_row("laco", _ppl(100.0, 100.0, 60.0, 60.0)), _row("laco:threshold=0.9", _ppl(20.0, 20.0, 90.0, 90.0)),
                _row("flattengpt:ridge=3", _ppl(1.0, 1.0, 1.0, 1.0))]
    _write(workspace, "2026-12-04", rows=rows[:2] + variants)
    _write(workspace, "2026-12-05", dtype="bfloat16", rows=rows * 3)  # more rows, but bfloat16
    assert _run(workspace, "--readme", str(readme)) == 0
    lines = readme.read_text().split("\n")
    region = lines[lines.index(render_results.README_BEGIN) : lines.index(render_results.README_END)]
    header = next(line for line in region if line.startswith("| method"))
    assert _cells(header) == ["method", "wikitext2", "alice", "from", "what it did"]
    assert "old" not in region and lines[-2:] == ["after", ""]
    methods = [_cells(line)[0] for line in region if line.startswith("| ") and line is not header and "---" not in line]
    # a strategy's option variants are left out; of LaCo the variant best on the validation texts, not on test
    assert methods == ["dense", "flattengpt", "laco:threshold=0.9", "shortgpt", "sleb:search_samples=4"]
    assert any(line.startswith("| flattengpt | **24.00** | **18.00** | 2026-12-04 |") for line in region)
    assert "smollm2-135m_remove6_2026-12-03.json" in "\n".join(region)


def test_the_committed_tables_are_those_the_committed_result_files_give():
    """RESULTS.md's and the README's generated regions are what ``benchmarks/results/*.json`` render to: no table
    edited by hand, no result file left out."""
    assert render_results.main(["--check"]) == 0
