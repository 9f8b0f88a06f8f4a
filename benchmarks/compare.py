"""Compare depth-reduction strategies on one harness: same model, calibration data and evaluation for all.

    python benchmarks/compare.py --model smollm2-135m --remove 6 \
        --methods flattengpt,shortgpt,sleb:search_samples=4,replaceme,angular \
        --calib default,wikipedia --eval wikitext2,alice --append benchmarks/RESULTS.md

A method is a registered strategy with optional ``:key=value`` options, parsed by ``flatten.options`` as
``flatten compress --method`` parses them (``flatten compress --help`` lists every strategy's options), e.g.
``flattengpt:scorer=magnitude:policy=greedy-recompute``, ``flattengpt:ridge=0.1`` (to the scorer),
``flattengpt:policy=fixed:policy.spans=9-10+13-14``. Here ``calibration=N`` also gives a method only the first N
calibration sequences (``flattengpt:calibration=8``: an ablation of the calibration size on nested subsets), and
``--plugin FILE`` imports a file that registers more strategies. Each runs on a fresh copy of the dense model.

``--calib`` names the calibration text (a mix or corpus of ``flatten.data``, or a file); with several, every
method runs on each, and the table is the cross table "calibrated on X, measured on Y". ``--eval`` names the
corpora perplexity is measured on: by default WikiText-2 (encyclopedic, the domain of the default mix's
Wikipedia leads) and ``alice`` (fiction, in no calibration mix). Below the table, the first method's perplexity
over the best other's, per calibration and evaluation corpus. Prints a markdown section (command, machine,
protocol, table); ``--append FILE`` also appends it to FILE.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from datetime import date
from pathlib import Path

from flatten import count_parameters, save_checkpoint
from flatten.data import CORPORA, EVALUATION_CORPORA, MIXES, calibration_description, calibration_tokens
from flatten.measure import PeakMemory, machine
from flatten.options import Method, load_plugins
from flatten.zeroshot import PAPER_TASKS, check_tasks, zero_shot
from harness import forward_seconds, publish, setup

GIB = 2**30


def plot(rows: list[dict], layers: int, path: str, title: str) -> None:
    """Perplexity against the removed fraction of the blocks, one line per method (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    first = next(iter(rows[0]["ppl"]))  # the first evaluation corpus
    dense = next(r["ppl"][first] for r in rows if r["method"] == "dense")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        points = sorted((r["remove"] / layers, r["ppl"][first]) for r in rows if r["method"] == method)
        ax.plot([0] + [x for x, _ in points], [dense] + [y for _, y in points], marker="o", label=method)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of blocks removed")
    ax.set_ylabel(f"{first} perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", required=True, help="blocks to remove; several, comma-separated, for a sweep")
    parser.add_argument("--methods", default="flattengpt,shortgpt", help="comma-separated methods (see above)")
    parser.add_argument("--calib", default="default",
                        help="calibration text: a mix or corpus of flatten.data, or a file; several, comma-separated, "
                             f"give every method each of them (mixes: {', '.join(MIXES)}; corpora: {', '.join(CORPORA)})")
    parser.add_argument("--eval", default=",".join(EVALUATION_CORPORA),
                        help="comma-separated corpora to measure perplexity on (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32, help="windows of each evaluation corpus for perplexity")
    parser.add_argument("--tasks", default=None, help="zero-shot tasks too: comma-separated, or 'paper' for all five")
    parser.add_argument("--limit", type=int, default=None, help="zero-shot items per task (default: all)")
    parser.add_argument("--save", default=None, help="save each compressed model (a stock checkpoint) under this folder")
    parser.add_argument("--plot", default=None, help="draw perplexity vs removed fraction into this PNG")
    parser.add_argument("--append", default=None, help="append the markdown section to this file")
    parser.add_argument("--device", default="cpu", help="where the model, every compression and every measurement "
                        "run, e.g. cuda (default cpu)")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE",
                        help="a Python file that registers strategies, scorers or policies (repeatable)")
    args = parser.parse_args()
    load_plugins(args.plugin)
    methods = []
    for text in args.methods.split(","):
        try:  # unknown names and options fail before anything is loaded
            method = Method.parse(text)
            samples = int(method.options.pop("calibration", args.samples))
            method.arguments()
        except ValueError as error:
            raise SystemExit(f"--methods {text}: {error}") from None
        if not 1 <= samples <= args.samples:
            raise SystemExit(f"calibration={samples} must lie in 1..--samples ({args.samples})")
        methods.append((method, samples, text.replace(":", " ")))
    removals = [int(k) for k in args.remove.split(",")]
    sources, evaluations = args.calib.split(","), tuple(args.eval.split(","))
    for name in evaluations:
        CORPORA.get(name)
    tasks = None if args.tasks is None else list(PAPER_TASKS) if args.tasks == "paper" else args.tasks.split(",")
    if tasks:
        check_tasks(tasks, args.limit)

    run = setup(args.model, args.samples, args.seq_len, args.windows, sources[0], evaluations)
    model = run.model.to(args.device)
    calibrations = {sources[0]: run.calibration}
    for source in sources[1:]:
        calibrations[source] = calibration_tokens(run.tokenizer, source, samples=args.samples, seq_len=args.seq_len)
    layers = model.config.num_hidden_layers
    forward = forward_seconds(model, run.calibration, batch_size=4)

    def measure(m, **row) -> dict:
        row.update(layers=len(m.model.layers), ppl=run.perplexities(m))
        if tasks:
            row["zero_shot"] = zero_shot(m, run.tokenizer, tasks, limit=args.limit)
        print({k: v for k, v in row.items()}, flush=True)
        return row

    rows = [measure(model, calib="", method="dense", remove=0, parameters=count_parameters(model), seconds=None,
                    forward=None, peak=None, what="")]
    for source, calibration in calibrations.items():
        for k in removals:
            for method, samples, label in methods:
                work = copy.deepcopy(model)
                with PeakMemory() as memory:
                    start = time.perf_counter()
                    work, record = method.build(work, calibration[:samples]).compress(remove=k)
                    seconds = time.perf_counter() - start
                if args.save and method.arguments().get("prune", True) is True:  # wide blocks: no stock checkpoint
                    folder = Path(args.save) / f"{source}_{label.replace(' ', '_').replace('=', '-')}_remove{k}"
                    save_checkpoint(work, folder, run.tokenizer, overwrite=True)
                    record.save(folder / "decisions.json")
                rows.append(measure(work, calib=source, method=label, remove=k,
                                    parameters=record.method.get("parameters_effective", count_parameters(work)),
                                    seconds=seconds, forward=forward * samples / args.samples, peak=memory.peak_bytes,
                                    what=record.describe()))
                del work

    zero_shot_note = ""
    if tasks:
        first = rows[0]["zero_shot"]
        zero_shot_note = (f" Zero-shot: lm-evaluation-harness {first.lm_eval_version}, 0-shot, "
                          + ("all items" if args.limit is None else f"the first {args.limit} items of each task")
                          + "; metric per task: " + ", ".join(f"{s.task} {s.metric}" for s in first.scores)
                          + "; the mean is over the tasks, with its standard error (from the tasks' own).")
    task_columns = [s.task for s in rows[0]["zero_shot"].scores] if tasks else []
    domains = " and ".join(f"{n} ({CORPORA.get(n).domain})" for n in evaluations)
    calibrated = "; ".join(f"`{source}`: {calibration_description(source)}" for source in sources)
    lines = [f"### {args.model}: strategies removing {args.remove} of {layers} blocks ({date.today()})", "",
             f"Command: `python {' '.join(sys.argv)}`", "", f"Machine: {machine()}", "",
             f"{run.protocol} Calibration sources (the `calibrated on` column): {calibrated}. Every strategy gets the "
             f"same calibration rows; strategies with `search_samples=N` search on the first N of them. "
             "Parameters: those that still compute (BlockPruner keeps "
             "removed sub-layers as zero weights in its stock checkpoint). Peak memory: resident set of the process "
             f"during compression (it holds the dense model too). Compress / forward: compression time over "
             f"that of one forward pass of the dense model over the calibration set ({forward:.1f} s, batches of 4, "
             f"best of two; scaled by the share of it a method with `calibration=N` uses).{zero_shot_note}", "",
             "| calibrated on | method | removed | layers | parameters |" + "".join(f" {n} ppl |" for n in evaluations)
             + "".join(f" {t} |" for t in task_columns) + (" zero-shot mean +- se |" if tasks else "")
             + " compress s | compress / forward | peak RSS GiB | what it did |",
             "|---" * (10 + len(evaluations) + len(task_columns) + bool(tasks)) + "|"]
    for r in rows:
        scores = "".join(f" {s.value:.3f} |" for s in r["zero_shot"].scores) + \
            f" {r['zero_shot'].mean:.3f} +- {r['zero_shot'].mean_stderr or float('nan'):.3f} |" if tasks else ""
        seconds = " | " if r["seconds"] is None else f"{r['seconds']:.1f} | {r['seconds'] / r['forward']:.1f}"
        peak = "" if r["peak"] is None else f"{r['peak'] / GIB:.2f}"
        ppl = "".join(f" {r['ppl'][n]:.2f} |" for n in evaluations)
        lines.append(f"| {r['calib']} | {r['method']} | {r['remove']} | {r['layers']} | {r['parameters']:,} |{ppl}"
                     f"{scores} {seconds} | {peak} | {r['what']} |")
    lines += ["", *ratios(rows, evaluations)]
    if args.plot:
        plot(rows, layers, args.plot, f"{args.model}: perplexity after depth reduction")
        lines += ["", f"Plot: `{args.plot}`"]
    publish(lines, args.append)


def ratios(rows: list[dict], evaluations: tuple[str, ...]) -> list[str]:
    """For each calibration and removal: the first method's perplexity over the best other strategy's (its own
    ablations left out), per evaluation corpus (below 1: the first method wins)."""
    lines = []
    for source in dict.fromkeys(r["calib"] for r in rows if r["calib"]):
        for k in dict.fromkeys(r["remove"] for r in rows if r["calib"] == source):
            group = [r for r in rows if r["calib"] == source and r["remove"] == k]
            if len(group) < 2:
                continue
            first = group[0]
            others = [r for r in group[1:] if r["method"].split()[0] != first["method"].split()[0]]
            if not others:
                continue
            cells = []
            for name in evaluations:
                best = min(others, key=lambda r: r["ppl"][name])
                cells.append(f"{name} {first['ppl'][name] / best['ppl'][name]:.3f} x ({best['method']})")
            lines.append(f"- `{first['method']}` against the best other strategy, calibrated on `{source}`, {k} removed: "
                         + "; ".join(cells))
    return lines


if __name__ == "__main__":
    main()
