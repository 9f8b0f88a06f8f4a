"""Compare depth-reduction strategies on one harness: same model, calibration data and evaluation for all.

    python benchmarks/compare.py --model smollm2-135m --remove 6 \
        --methods flattengpt,flattengpt:scorer=flattengpt,shortgpt,laco,sleb:search_samples=4 \
        --append benchmarks/RESULTS.md

A method is a registered strategy (``flatten.compressor.STRATEGIES``: flattengpt, shortgpt, sleb, laco,
blockpruner) with optional ``:key=value`` options for its constructor (several joined by ``:``), e.g.
``flattengpt:scorer=magnitude:policy=greedy-recompute``. Each runs on a fresh copy of the dense model.
Prints a markdown section (command, machine, protocol, table); ``--append FILE`` also appends it to FILE.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from datetime import date

import torch

from flatten import count_parameters, load_model, perplexity
from flatten.compressor import get_strategy
from flatten.data import LINE_JOIN, calibration_tokens, read_lines, tokenize, wikitext2_test_path
from flatten.measure import PeakMemory, machine

GIB = 2**30


def parse_method(text: str) -> tuple[str, dict]:
    """``"name:key=value:key=value"`` -> ``(name, {key: value})``; values become int, float or str."""
    name, *pairs = text.split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"method option {pair!r} in {text!r} is not key=value")
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        options[key] = value
    return name, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", type=int, required=True, help="blocks to remove")
    parser.add_argument("--methods", default="flattengpt,shortgpt", help="comma-separated methods (see above)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32, help="WikiText-2 test windows for perplexity")
    parser.add_argument("--append", default=None, help="append the markdown section to this file")
    args = parser.parse_args()
    methods = [parse_method(m) for m in args.methods.split(",")]
    for name, _ in methods:
        get_strategy(name)  # unknown names fail before anything is loaded

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    layers = model.config.num_hidden_layers
    calibration = calibration_tokens(tokenizer, samples=args.samples, seq_len=args.seq_len)
    text = wikitext2_test_path()
    if text is None:
        sys.exit("needs the WikiText-2 test split at ../shared/data/wikitext-2-raw/wiki.test.raw")
    eval_ids = tokenize(tokenizer, read_lines(text), max_tokens=args.windows * args.seq_len)

    def ppl(m) -> float:
        return perplexity(m, eval_ids, seq_len=args.seq_len, max_windows=args.windows).value

    rows = [("dense", layers, count_parameters(model), ppl(model), None, None, "")]
    print(f"dense perplexity {rows[0][3]:.2f}", flush=True)
    for name, options in methods:
        work = copy.deepcopy(model)
        with PeakMemory() as memory:
            start = time.perf_counter()
            work, record = get_strategy(name)(work, calibration, **options).compress(remove=args.remove)
            seconds = time.perf_counter() - start
        if hasattr(record, "spans"):
            what = "flattened " + " ".join(f"{a}-{c}" for a, c in record.spans)
        elif record.collapsed:
            what = "collapsed " + " ".join(f"{a}-{c}" for a, c in record.collapsed)
        else:
            what = "removed " + " ".join(map(str, record.removed))
            what += (" + zeroed " + " ".join(f"{i}{k[0]}" for i, k in record.zeroed)) if record.zeroed else ""
        label = name + "".join(f" {k}={v}" for k, v in options.items())
        params = record.method.get("parameters_effective", count_parameters(work))
        rows.append((label, len(work.model.layers), params, ppl(work), seconds, memory.peak_bytes, what))
        print(rows[-1], flush=True)
        del work

    lines = [f"### {args.model}: strategies removing {args.remove} of {layers} blocks ({date.today()})", "",
             f"Command: `python {' '.join(sys.argv)}`", "", f"Machine: {machine()}", "",
             f"Calibration: {args.samples} x {args.seq_len} tokens of Wikipedia lead sections (seed 0); strategies "
             "with `search_samples=N` search on its first N sequences. Perplexity: first "
             f"{args.windows} non-overlapping windows of {args.seq_len} tokens of WikiText-2 test (`{text.name}`, "
             f"non-empty lines joined by {LINE_JOIN!r}). Parameters: those that still compute (BlockPruner keeps "
             "removed sub-layers as zero weights in its stock checkpoint). Peak memory: resident set of the process "
             "during compression (it holds the dense model too).", "",
             "| method | layers | parameters | WikiText-2 ppl | compress s | peak RSS GiB | what it did |",
             "|---|---|---|---|---|---|---|"]
    for label, n, params, value, seconds, peak, what in rows:
        lines.append(f"| {label} | {n} | {params:,} | {value:.2f} | {'' if seconds is None else f'{seconds:.1f}'} | "
                     f"{'' if peak is None else f'{peak / GIB:.2f}'} | {what} |")
    section = "\n".join(lines) + "\n"
    print("\n" + section)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + section)


if __name__ == "__main__":
    main()
