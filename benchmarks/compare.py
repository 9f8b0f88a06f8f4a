"""Compare depth-reduction strategies on one harness: same model, calibration data and evaluation for all.

    python benchmarks/compare.py --model smollm2-135m --remove 6 \
        --methods cut-absorb,cut-merge,flattengpt,shortgpt,sleb:search_samples=4,replaceme,angular \
        --calib default,wikipedia --eval validation,test

A method is a registered strategy with optional ``:key=value`` options, parsed by ``flatten.strategies.options`` as
``flatten compress --method`` parses them (``flatten compress --help`` lists every strategy's options), e.g.
``flattengpt:scorer=magnitude:policy=greedy-recompute``, ``flattengpt:ridge=0.1`` (to the scorer),
``cut-absorb:policy=fixed:policy.spans=9-10+13-14``. Here ``calibration=N`` also gives a method only the first N
calibration sequences (``cut-merge:calibration=8``: an ablation of the calibration size on nested subsets), and
``--plugin FILE`` imports a file that registers more strategies. Each runs on a fresh copy of the dense model.

``--calib`` names the calibration text (a mix or corpus of ``flatten.data``, or a file); with several, every
method runs on each ("calibrated on X, measured on Y"). ``--eval`` names the texts perplexity is measured on:
corpora of ``flatten.data`` and the words ``validation`` (``VALIDATION_TEXTS``, on which defaults are chosen)
and ``test`` (``TEST_TEXTS``, which results report and which chose nothing); by default both.

The results are data: the run writes one JSON file (``--json PATH``; by default
``benchmarks/results/<model>_remove<K>_<date>.json``), rewritten after every row so that a stopped run keeps
the rows it measured, holding the command, the code's commit, the machine, the calibration, the protocol, each
text's role and domain, and one row per method (the dense model first). ``benchmarks/render_results.py`` turns
every such file into the tables of ``benchmarks/RESULTS.md``; this script prints the same table.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

from flatten import count_parameters, save_checkpoint
from flatten.data import (CORPORA, MIXES, TEST_TEXTS, VALIDATION_TEXTS, calibration_description, calibration_domains,
                          token_sha256)
from flatten.evaluation.measure import machine
from flatten.evaluation.zeroshot import PAPER_TASKS, check_tasks, zero_shot
from flatten.files import write_atomically
from flatten.run.pipeline import Calibration, compress_timed
from flatten.strategies.options import Method, load_plugins
from harness import code_version, forward_seconds, setup
from render_results import render_table


def plot(rows: list[dict], layers: int, path: str, title: str) -> None:
    """Perplexity against the removed fraction of the blocks, one line per method (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    first = next(iter(rows[0]["perplexity"]))  # the first evaluation corpus
    dense = next(r["perplexity"][first] for r in rows if r["method"] == "dense")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        points = sorted((r["remove"] / layers, r["perplexity"][first]) for r in rows if r["method"] == method)
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


SEED = 0  # of the calibration windows (harness.setup draws them with calibration_tokens' default seed, 0)
RESULTS = Path(__file__).resolve().parent / "results"


def expand_texts(spec: str) -> tuple[str, ...]:
    """Comma-separated corpus names, ``validation`` and ``test`` standing for their sets; each once, in order."""
    names = []
    for word in spec.split(","):
        names += {"validation": VALIDATION_TEXTS, "test": TEST_TEXTS}.get(word.strip(), (word.strip(),))
    for name in names:
        CORPORA.get(name)  # an unknown name fails before anything is loaded
    return tuple(dict.fromkeys(names))


def role(name: str) -> str:
    return "validation" if name in VALIDATION_TEXTS else "test" if name in TEST_TEXTS else "other"


def default_json(model: str, remove: str, day: str) -> Path:
    """``results/<model>_remove<K>_<date>.json``, with ``_2``, ``_3``... where that file exists."""
    stem = re.sub(r"[^A-Za-z0-9.+-]+", "-", Path(model).name.removesuffix(".gguf")).strip("-") or "model"
    stem = f"{stem}_remove{remove.replace(',', '-')}_{day}"
    path, n = RESULTS / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = RESULTS / f"{stem}_{n}.json"
    return path


def jsonable(value):
    """``value`` with what JSON cannot hold (tensors, paths, tuples as keys...) turned into strings."""
    return json.loads(json.dumps(value, default=str))


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, ensure_ascii=False) + "\n"
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", required=True, help="blocks to remove; several, comma-separated, for a sweep")
    parser.add_argument("--methods", default="cut-absorb,flattengpt,shortgpt", help="comma-separated methods (see above)")
    parser.add_argument("--calib", default="default",
                        help="calibration text: a mix or corpus of flatten.data, or a file; several, comma-separated, "
                             f"give every method each of them (mixes: {', '.join(MIXES)}; corpora: {', '.join(CORPORA)})")
    parser.add_argument("--eval", default="validation,test",
                        help="comma-separated texts to measure perplexity on: corpora, or 'validation' "
                             f"({', '.join(VALIDATION_TEXTS)}) and 'test' ({', '.join(TEST_TEXTS)}) "
                             "(default: %(default)s)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32, help="windows of each evaluation corpus for perplexity")
    parser.add_argument("--tasks", default=None, help="zero-shot tasks too: comma-separated, or 'paper' for all five")
    parser.add_argument("--limit", type=int, default=None, help="zero-shot items per task (default: all)")
    parser.add_argument("--save", default=None, help="save each compressed model (a stock checkpoint) under this folder")
    parser.add_argument("--plot", default=None, help="draw perplexity vs removed fraction into this PNG")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the results here (default: benchmarks/results/<model>_remove<K>_<date>.json)")
    parser.add_argument("--title", default=None,
                        help="what the run is about, for the heading of its table (e.g. 'every strategy')")
    parser.add_argument("--device", default="cpu", help="where the model, every compression and every measurement "
                        "run, e.g. cuda (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the weights' dtype, as the model is compressed and measured (default float32)")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE",
                        help="a Python file that registers strategies, scorers or policies (repeatable)")
    args = parser.parse_args()
    code = code_version()  # now, not after loading: the commit of the code this process imported
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
        methods.append((method, samples, text))
    removals = [int(k) for k in args.remove.split(",")]
    sources = args.calib.split(",")
    try:
        evaluations = expand_texts(args.eval)
    except ValueError as error:
        raise SystemExit(f"--eval: {error}") from None
    tasks = None if args.tasks is None else list(PAPER_TASKS) if args.tasks == "paper" else args.tasks.split(",")
    if tasks:
        check_tasks(tasks, args.limit)
    day = date.today().isoformat()
    path = Path(args.json) if args.json else default_json(args.model, args.remove, day)

    run = setup(args.model, args.samples, args.seq_len, args.windows, sources[0], evaluations)
    model = run.model.to(args.device, getattr(torch, args.dtype))
    calibrations = {sources[0]: run.calibration}
    for source in sources[1:]:
        calibrations[source], _ = Calibration(source, args.samples, args.seq_len, SEED).tokens(run.tokenizer)
    layers = model.config.num_hidden_layers
    forward = forward_seconds(model, run.calibration, batch_size=4)
    result = {
        "schema": 1,
        "complete": False,  # true once every row is measured
        "title": args.title,
        "command": "python " + shlex.join(sys.argv),
        "argv": sys.argv,
        "code": code,
        "date": day,
        "machine": machine(),
        "device": args.device,
        "dtype": args.dtype,
        "model": {"name": args.model, "layers": layers, "parameters": count_parameters(model)},
        "remove": removals,
        "calibrations": [{"name": source, "description": calibration_description(source),
                          "domains": calibration_domains(source), "samples": args.samples, "seq_len": args.seq_len,
                          "seed": SEED, "sha256": token_sha256(ids)} for source, ids in calibrations.items()],
        "evaluation": {"metric": "perplexity", "windows": args.windows, "seq_len": args.seq_len,
                       "protocol": run.protocol},
        "texts": [{"name": name, "role": role(name), "domain": CORPORA.get(name).domain,
                   "source": CORPORA.get(name).source, "windows": run.windows_of(name)} for name in evaluations],
        "forward_seconds": forward,  # one forward pass of the dense model over the calibration set, batches of 4
        "zero_shot": None if not tasks else {"tasks": tasks, "limit": args.limit},
        "rows": [],
    }

    def measure(m, **row) -> dict:
        row.update(layers=len(m.model.layers), perplexity=run.perplexities(m))
        if tasks:
            row["zero_shot"] = zero_shot(m, run.tokenizer, tasks, limit=args.limit).as_dict()
        print(row, flush=True)
        result["rows"].append(jsonable(row))
        write_json(path, result)
        return row

    measure(model, method="dense", calibration=None, remove=0, parameters=count_parameters(model),
            compress_seconds=None, compress_forward_ratio=None, peak_memory_bytes=None, cuda_peak_bytes=None,
            what="", record=None)
    for source, calibration in calibrations.items():
        for k in removals:
            for method, samples, text in methods:
                done = compress_timed(method.build(copy.deepcopy(model), calibration[:samples]), k)
                work, record, seconds = done.model, done.decisions, done.seconds
                if args.save and method.arguments().get("prune", True) is True:  # wide blocks: no stock checkpoint
                    label = text.replace(":", "_").replace("=", "-")
                    folder = Path(args.save) / f"{source}_{label}_remove{k}"
                    save_checkpoint(work, folder, run.tokenizer, overwrite=True)
                    record.save(folder / "decisions.json")
                scaled = forward * samples / args.samples  # the share of the calibration set it used
                measure(work, method=text, calibration=source, remove=k, calibration_samples=samples,
                        parameters=record.method.get("parameters_effective", count_parameters(work)),
                        compress_seconds=seconds, compress_forward_ratio=seconds / scaled,
                        peak_memory_bytes=done.peak_memory_bytes, cuda_peak_bytes=done.cuda_peak_bytes,
                        what=record.describe(), record=record.method)
                del work

    result["complete"] = True
    if args.plot:
        plot(result["rows"], layers, args.plot, f"{args.model}: perplexity after depth reduction")
        result["plot"] = args.plot
    write_json(path, result)
    print("\n" + "\n".join(render_table(result, path.name)) + "\n")
    print(f"wrote {path}; python benchmarks/render_results.py puts every result into benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
