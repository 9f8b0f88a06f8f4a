"""Turn the results of ``compare.py`` (JSON files under ``benchmarks/results/``) into the tables of RESULTS.md.

    python benchmarks/render_results.py            # rewrite the generated regions of RESULTS.md and README.md
    python benchmarks/render_results.py --check    # exit 1 if it is not what the JSON files give

Only the lines between ``<!-- generated: begin -->`` and ``<!-- generated: end -->`` change (the markers are
put at the top of the section "## Quality ..." the first time, before its first table); every other line of
the file stays as it is. One table per JSON file, newest first: model, removal, calibration, the command and
the machine above it; perplexity on the validation texts (``val:`` columns, on which defaults are chosen), then
on the test texts (``test:`` columns, which chose nothing); the lowest perplexity of the compressed models in
bold per text and per (calibration, removal); and below it, each method's perplexity over that of the best
baseline per test text. Before those, one table per setup that several files measured (the same model, removal,
calibration tokens, windows and dtype): every method measured at it, each from the newest file that ran it, so
that a baseline run in one file and the default run in another are compared side by side. The README's region
between ``<!-- generated: headline begin -->`` and ``<!-- generated: headline end -->`` gets, per model, the test
columns of the float32 setup that compares the most methods, a baseline among them: the dense model, each
strategy as registered (no option), and of each baseline the variant best on the validation texts.
Rendering is deterministic: running it twice gives the same files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- generated: begin -->", "<!-- generated: end -->"
README_BEGIN, README_END = "<!-- generated: headline begin -->", "<!-- generated: headline end -->"
NOTE = ("<!-- Written by benchmarks/render_results.py from benchmarks/results/*.json (compare.py writes them): "
        "edit those and run it again, not these lines. -->")
SECTION = "## Quality"  # the markers go at the top of the section whose heading starts so
BASELINES = ("shortgpt", "sleb", "laco", "blockpruner", "replaceme", "angular")  # and their option variants
ROLES = ("validation", "test", "other")
PREFIX = {"validation": "val", "test": "test", "other": "other"}
GIB = 2**30


def strategy(method: str) -> str:
    """The registered strategy of a method string (``sleb:search_samples=4`` -> ``sleb``)."""
    return method.split(":")[0].split()[0].strip()


def is_baseline(method: str) -> bool:
    return strategy(method) in BASELINES


def load_results(folder: Path) -> list[tuple[str, dict]]:
    """``(file name, result)`` of every JSON file in ``folder``, newest first (by date, then name)."""
    results = [(path.name, json.loads(path.read_text(encoding="utf-8")))
               for path in sorted(Path(folder).glob("*.json"))]
    return sorted(results, key=lambda item: (item[1].get("date", ""), item[0]), reverse=True)


def _cell(text) -> str:
    return "" if text is None else str(text).replace("|", "\\|").replace("\n", " ").strip()


def _number(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _ordered_texts(result: dict) -> list[dict]:
    """The texts, validation first, then test, then any other, each group in the order measured."""
    return sorted(result["texts"], key=lambda t: ROLES.index(t.get("role", "other")))


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """The compressed rows by (calibration, removal), in the order run."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["method"] != "dense":
            groups.setdefault((row.get("calibration"), row["remove"]), []).append(row)
    return groups


def _best(groups: dict[tuple, list[dict]], texts: list[dict]) -> set[tuple[int, str]]:
    """(id of a row, text) of the lowest perplexity per text within each group (ties all bold)."""
    bold = set()
    for rows in groups.values():
        for text in texts:
            values = [r["perplexity"].get(text["name"]) for r in rows]
            values = [v for v in values if v is not None]
            if values:
                bold |= {(id(r), text["name"]) for r in rows if r["perplexity"].get(text["name"]) == min(values)}
    return bold


def _column(text: dict) -> str:
    """A perplexity column's heading: the text's role, then its name (``val: paradise-lost``)."""
    return f"{PREFIX[text.get('role', 'other')]}: {text['name']}"


def _perplexity(row: dict, text: dict, bold: set[tuple[int, str]]) -> str:
    """A row's perplexity on ``text``, in bold where ``_best`` marked it."""
    value = _number(row["perplexity"].get(text["name"]), 2)
    return f"**{value}**" if (id(row), text["name"]) in bold else value


def setup_of(result: dict) -> tuple:
    """What must be equal for two results' rows to be compared: model, removal, calibration tokens, windows, dtype."""
    calibration, evaluation = result["calibrations"][0], result["evaluation"]
    return (result["model"]["name"], tuple(result["remove"]), calibration["name"], calibration["sha256"],
            evaluation["windows"], evaluation["seq_len"], result.get("dtype", "float32"))


def pooled(results: list[tuple[str, dict]]) -> list[tuple[list[str], dict]]:
    """Per setup (``setup_of``), newest first: the files that measured it and one result holding every method
    measured at the setup's own calibration (dense first, then the library's methods, then the baselines), each
    row from the newest file that ran that method, a text it lacks filled from an older one, and ``sources``
    naming the files its numbers come from."""
    by_setup: dict[tuple, list[tuple[str, dict]]] = {}
    for name, result in results:  # newest first
        by_setup.setdefault(setup_of(result), []).append((name, result))
    out = []
    for group in by_setup.values():
        newest = group[0][1]
        calibration = newest["calibrations"][0]["name"]
        texts, rows = {}, {}
        for name, result in group:
            for text in result["texts"]:
                texts.setdefault(text["name"], text)
            for row in result["rows"]:
                if row["method"] != "dense" and row.get("calibration") != calibration:
                    continue
                merged = rows.setdefault(row["method"], {**row, "perplexity": {}, "sources": []})
                missing = {k: v for k, v in row["perplexity"].items() if k not in merged["perplexity"]}
                if missing or not merged["sources"]:
                    merged["perplexity"].update(missing)
                    merged["sources"].append(name)
        order = sorted(rows.values(), key=lambda r: (r["method"] != "dense", is_baseline(r["method"])))
        out.append(([name for name, _ in group], {**newest, "texts": list(texts.values()), "rows": order}))
    return out


def geometric_mean(row: dict, texts: list[dict]) -> float | None:
    """The geometric mean of a row's perplexities over ``texts``; None unless it has every one."""
    values = [row["perplexity"].get(t["name"]) for t in texts]
    if not values or None in values:
        return None
    return math.prod(values) ** (1 / len(values))


def ratio_lines(result: dict) -> list[str]:
    """Per (calibration, removal): each method's perplexity over the best baseline's, per test text."""
    tests = [t["name"] for t in result["texts"] if t.get("role") == "test"]
    if not tests:
        return ["Ratio to the best baseline: no test text was measured."]
    lines = []
    groups = _groups(result["rows"])
    for (source, k), rows in groups.items():
        where = (f", calibrated on `{source}`, {k} removed" if len(groups) > 1 else "")
        baselines = [r for r in rows if is_baseline(r["method"])]
        if not baselines:
            lines.append(f"Ratio to the best baseline{where}: no baseline ({', '.join(BASELINES)}) in this run.")
            continue
        tests_measured = [name for name in tests if any(name in r["perplexity"] for r in baselines)]
        best = {name: min((r for r in baselines if name in r["perplexity"]), key=lambda r: r["perplexity"][name])
                for name in tests_measured}
        cells = []
        for row in rows:
            ratios = " / ".join(f"{row['perplexity'][name] / best[name]['perplexity'][name]:.3f}"
                                if name in row["perplexity"] else "n/a" for name in tests_measured)
            cells.append(f"{_cell(row['method'])} {ratios}")
        lines.append(f"Ratio to the best baseline{where}, per test text ({' / '.join(tests_measured)}; perplexity "
                     f"over the lowest of the baselines {', '.join(BASELINES)} and their variants, below 1: better "
                     "than every one; best: "
                     + ", ".join(f"{name} {_cell(best[name]['method'])}" for name in tests_measured) + "): "
                     + "; ".join(cells) + ".")
    return lines


def render_table(result: dict, name: str) -> list[str]:
    """The markdown section of one result (its heading, what was run where, the table, the ratios)."""
    model, rows = result["model"], result["rows"]
    removed = ",".join(map(str, result["remove"]))
    title = f"{result['title']}, " if result.get("title") else ""
    code = result.get("code") or {}
    commit = code.get("commit")
    version = ("code of an unknown commit" if not commit else f"code of commit {commit[:7]}"
               + (", with uncommitted changes" if code.get("dirty") else ""))
    stopped = "" if result.get("complete", True) else f" The run stopped after these {len(rows)} rows."
    lines = [f"### {model['name']}: {title}{removed} of {model['layers']} blocks removed ({result['date']})", "",
             f"From `benchmarks/results/{name}`.{stopped} Command: `{result['command']}` ({version}).", "",
             f"Machine: {result['machine']}; device {result.get('device', 'cpu')}; weights in "
             f"{result.get('dtype', 'float32')}.", ""]
    calibrations = "; ".join(
        f"`{c['name']}`: {c['samples']} x {c['seq_len']} tokens of {c['description']} (seed {c['seed']}, token "
        f"sha256 {c['sha256'][:12]})" for c in result["calibrations"])
    evaluation, texts = result["evaluation"], _ordered_texts(result)
    short = [f"{t['name']} {t['windows']}" for t in texts
             if t.get("windows", evaluation["windows"]) < evaluation["windows"]]
    sets = "; ".join(
        f"{label}: " + ", ".join(f"`{t['name']}` ({t['domain']})" for t in texts if t.get("role") == role)
        for role, label in (("validation", "validation texts (`val:`, on which defaults are chosen)"),
                            ("test", "test texts (`test:`, which chose nothing)"), ("other", "other texts"))
        if any(t.get("role") == role for t in texts))
    zero = result.get("zero_shot")
    scored = [r for r in rows if r.get("zero_shot")]
    tasks = [s["task"] for s in scored[0]["zero_shot"]["scores"]] if scored else []
    zero_note = ""
    if scored:
        first = scored[0]["zero_shot"]
        zero_note = (f" Zero-shot: lm-evaluation-harness {first['lm_eval_version']}, 0-shot, "
                     + ("all items" if first.get("limit") is None else f"the first {first['limit']} items of each task")
                     + "; metric per task: " + ", ".join(f"{s['task']} {s['metric']}" for s in first["scores"])
                     + "; the mean is over the tasks, with its standard error.")
    elif zero:
        zero_note = " Zero-shot tasks were asked for but no row has them yet."
    forward = result.get("forward_seconds")
    lines += [f"Calibration (the `calibrated on` column): {calibrations}. Every strategy gets the same calibration "
              "rows; `search_samples=N` searches on the first N, `calibration=N` gets only the first N. "
              f"Perplexity: the first {evaluation['windows']} non-overlapping windows of {evaluation['seq_len']} "
              "tokens of each text" + (f" (fewer where a text holds fewer: {', '.join(short)})" if short else "")
              + f"; {sets}. Bold: the lowest perplexity of the compressed models, per text"
              + (" and per calibration and removal" if len(_groups(rows)) > 1 else "")
              + ". Parameters: those that still compute. Peak memory: resident set of the process during compression "
              "(it holds the dense model too). Compress / forward: compression time over one forward pass of the "
              "dense model over the calibration set" + (f" ({forward:.1f} s, batches of 4)" if forward else "")
              + f".{zero_note}", ""]
    header = ["calibrated on", "method", "removed", "layers", "parameters",
              *(_column(t) for t in texts), *tasks,
              *(["zero-shot mean +- se"] if tasks else []),
              "compress s", "compress / forward", "peak RSS GiB", "what it did"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    bold = _best(_groups(rows), texts)
    for row in rows:
        ppl = [_perplexity(row, t, bold) for t in texts]
        scores = []
        if tasks:
            shot = row.get("zero_shot")
            if shot:
                by_task = {s["task"]: s["value"] for s in shot["scores"]}
                se = shot.get("mean_stderr")
                scores = [_number(by_task.get(task), 3) for task in tasks]
                scores.append(f"{shot['mean']:.3f} +- {_number(se, 3) or 'n/a'}")
            else:
                scores = [""] * (len(tasks) + 1)
        peak = _number(None if row.get("peak_memory_bytes") is None else row["peak_memory_bytes"] / GIB, 2)
        if row.get("cuda_peak_bytes"):
            peak += f" (CUDA {row['cuda_peak_bytes'] / GIB:.2f})"
        cells = [_cell(row.get("calibration")), _cell(row["method"]), str(row["remove"]), str(row["layers"]),
                 f"{row['parameters']:,}", *ppl, *scores, _number(row.get("compress_seconds"), 1),
                 _number(row.get("compress_forward_ratio"), 1), peak, _cell(row.get("what"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", *ratio_lines(result)]


def _short(name: str) -> str:
    """A result file's name without its model and extension (``m_remove6_2026-12-05_cpu.json``: ``2026-12-05_cpu``)."""
    stem = name.removesuffix(".json")
    return stem.split("_", 2)[2] if stem.count("_") >= 2 else stem


def render_pooled(names: list[str], result: dict) -> list[str]:
    """One setup measured by several files: every method, the validation geometric mean, the files each row is
    from, and the ratios to the best baseline."""
    model, texts = result["model"], _ordered_texts(result)
    validation = [t for t in texts if t.get("role") == "validation"]
    calibration, evaluation = result["calibrations"][0], result["evaluation"]
    lines = [f"### {model['name']}: every method at one setup, {','.join(map(str, result['remove']))} of "
             f"{model['layers']} blocks removed (pooled from {len(names)} tables)", "",
             f"Calibration `{calibration['name']}`, {calibration['samples']} x {calibration['seq_len']} tokens (token "
             f"sha256 {calibration['sha256'][:12]}), the same rows for every method; the first "
             f"{evaluation['windows']} windows of {evaluation['seq_len']} tokens per text; weights in "
             f"{result.get('dtype', 'float32')}. Each row comes from the newest of these files that ran the method "
             "(`from`; a text it lacks from an older one), its command and machine are above that file's own table: "
             + ", ".join(f"`{name}`" for name in names) + ". `val: geometric mean`: over the validation texts, the "
             "number defaults are chosen by.", ""]
    header = ["method", "from", *(_column(t) for t in validation),
              *(["val: geometric mean"] if validation else []),
              *(_column(t) for t in texts if t not in validation),
              "what it did"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = result["rows"]
    bold = _best(_groups(rows), texts)
    means = {id(r): geometric_mean(r, validation) for r in rows}
    compressed = [means[id(r)] for r in rows if r["method"] != "dense" and means[id(r)] is not None]
    for row in rows:
        mean = _number(means[id(row)], 2)
        if row["method"] != "dense" and compressed and means[id(row)] == min(compressed):
            mean = f"**{mean}**"
        cells = [_cell(row["method"]), ", ".join(_short(n) for n in row["sources"]),
                 *(_perplexity(row, t, bold) for t in validation), *([mean] if validation else []),
                 *(_perplexity(row, t, bold) for t in texts if t not in validation), _cell(row.get("what"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", *ratio_lines(result)]


def render(results: list[tuple[str, dict]]) -> list[str]:
    """The generated region, markers included."""
    lines = [BEGIN, NOTE, ""]
    if not results:
        lines += ["No results under `benchmarks/results/` yet.", ""]
    for names, result in pooled(results):
        if len(names) > 1:
            lines += [*render_pooled(names, result), ""]
    for name, result in results:
        lines += [*render_table(result, name), ""]
    return lines + [END]


def _headline_worthy(result: dict) -> bool:
    return bool(result.get("dtype", "float32") == "float32"
                and any(t.get("role") == "test" for t in result["texts"])
                and any(is_baseline(r["method"]) for r in result["rows"]))


def _headline_rows(result: dict) -> list[dict]:
    """The dense model, each strategy as registered (no option), and of each baseline the variant with the
    lowest geometric mean over the validation texts (every variant where no validation text was measured)."""
    validation = [t for t in result["texts"] if t.get("role") == "validation"]
    chosen: dict[str, tuple[float, dict]] = {}
    for row in result["rows"]:
        if not is_baseline(row["method"]):
            continue
        if not validation:
            chosen[row["method"]] = (0.0, row)
            continue
        mean = geometric_mean(row, validation)
        if mean is not None and mean < chosen.get(strategy(row["method"]), (float("inf"),))[0]:
            chosen[strategy(row["method"])] = (mean, row)
    shown = {id(row) for _, row in chosen.values()}
    shown |= {id(r) for r in result["rows"] if ":" not in r["method"] and not is_baseline(r["method"])}
    return [r for r in result["rows"] if id(r) in shown]


def headline(results: list[tuple[str, dict]]) -> list[str]:
    """The README's region: per model, the float32 setup with test texts that compares the most methods, a
    baseline among them (the newest of equals; its rows pooled from every file that measured it), its test texts
    only, and the rows of ``_headline_rows``."""
    lines, chosen = [README_BEGIN, NOTE, ""], {}
    setups = pooled(results)
    for names, result in setups:  # newest first: an older setup is chosen only where it has more rows
        model = result["model"]["name"]
        if _headline_worthy(result) and len(result["rows"]) > len(chosen.get(model, (None, {"rows": []}))[1]["rows"]):
            chosen[model] = (names, result)
    for names, result in sorted(chosen.values(), key=lambda item: setups.index(item)):
        model = result["model"]["name"]
        tests = [t for t in result["texts"] if t.get("role") == "test"]
        rows = _headline_rows(result)
        calibration = result["calibrations"][0]
        lines += [f"{model}, {','.join(map(str, result['remove']))} of {result['model']['layers']} blocks removed, "
                  f"calibrated on {calibration['samples']} x {calibration['seq_len']} tokens of "
                  f"`{calibration['name']}`, {result['evaluation']['windows']} windows of "
                  f"{result['evaluation']['seq_len']} tokens per text, the same calibration for every method; of "
                  "each baseline the variant best on the validation texts (from "
                  + ", ".join(f"`benchmarks/results/{name}`" for name in names)
                  + "; the validation columns, every variant and each file's command, machine and times are in "
                  "RESULTS.md):", "",
                  "| method | " + " | ".join(t["name"] for t in tests) + " | from | what it did |",
                  "|---|" + "---|" * (len(tests) + 2)]
        bold = _best(_groups(rows), tests)
        for row in rows:
            cells = [_perplexity(row, t, bold) for t in tests]
            lines.append(f"| {_cell(row['method'])} | " + " | ".join(cells)
                         + f" | {', '.join(_short(n) for n in row['sources'])} | {_cell(row.get('what'))} |")
        lines += ["", *ratio_lines({**result, "rows": rows}), ""]
    return lines + [README_END]


def update(text: str, region: list[str], begin: str = BEGIN, end: str = END) -> str:
    """``text`` with the lines between the markers (markers included) replaced by ``region``; where there are no
    markers, ``region`` goes before the first subsection of the section "## Quality ..."."""
    lines = text.split("\n")
    if begin in lines or end in lines:
        if not (begin in lines and end in lines and lines.index(begin) < lines.index(end)):
            raise ValueError(f"the markers {begin} and {end} must both be there, in that order")
        start, stop = lines.index(begin), lines.index(end)
        return "\n".join(lines[:start] + region + lines[stop + 1 :])
    heading = next((i for i, line in enumerate(lines) if line.startswith(SECTION)), None)
    if heading is None:
        raise ValueError(f"no section '{SECTION} ...' to put the generated tables in; add the lines {BEGIN} and "
                         f"{END} where they belong")
    at = next((i for i in range(heading + 1, len(lines)) if lines[i].startswith(("## ", "### "))), len(lines))
    return "\n".join(lines[:at] + region + [""] + lines[at:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(HERE / "results"), help="folder of JSON files (default: %(default)s)")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"), help="the file to rewrite (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is out of date")
    parser.add_argument("--readme", default=None, help="a README whose headline region (between its markers) is "
                        "rewritten too (default: the project's README.md, unless --out names another file)")
    args = parser.parse_args(argv)
    results = load_results(Path(args.results))
    readme = args.readme or (HERE.parent / "README.md" if Path(args.out) == HERE / "RESULTS.md" else None)
    targets = [(Path(args.out), render(results), (BEGIN, END))]
    if readme is not None:
        targets.append((Path(readme), headline(results), (README_BEGIN, README_END)))
    stale = 0
    for out, region, markers in targets:
        before = out.read_text(encoding="utf-8")
        after = update(before, region, *markers)
        stale += after != before
        if args.check:
            print(f"{out}: {'up to date' if after == before else 'out of date; run benchmarks/render_results.py'}")
        elif after != before:
            out.write_text(after, encoding="utf-8")
        if not args.check:
            print(f"{out}: {len(results)} result file(s), {'rewritten' if after != before else 'unchanged'}")
    return int(args.check and stale > 0)


if __name__ == "__main__":
    sys.exit(main())
