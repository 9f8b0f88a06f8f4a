"""What each merge of a plan costs on its own, against dropping one block of the pair instead.

    python benchmarks/pairs.py --model qwen2.5-coder-0.5b --remove 5 --windows 8

Plans the merges as the default ``Flattener`` would (or takes ``--pairs``), then, for each pair i, i+1 in the
otherwise dense model, measures the WikiText-2 perplexity with the pair replaced by: the wide flattened block
(flatten only: nothing pruned), the pruned merge the default compressor builds there when it is the only merge,
the first block alone (the second dropped) and the second alone. A span of more than two blocks contributes
each of its pairs. One merge's cost in isolation is not its cost in the compressed model (the merges below it
change its input), but it shows which pairs hurt and whether dropping a block would have done better there.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date

from flatten import Flattener
from flatten.evaluation.measure import machine
from flatten.merge import swapped_blocks
from harness import publish, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", type=int, default=None, help="diagnose the pairs of the default plan for this many")
    parser.add_argument("--pairs", default=None, help="or these pairs: comma-separated first blocks, e.g. 10,13")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows for perplexity")
    parser.add_argument("--append", default=None, help="append the markdown section to this file")
    args = parser.parse_args()
    if (args.remove is None) == (args.pairs is None):
        raise SystemExit("give exactly one of --remove (the default plan's pairs) or --pairs")

    start = time.perf_counter()
    run = setup(args.model, args.samples, args.seq_len, args.windows)
    model = run.model
    flattener = Flattener(model, run.calibration)
    if args.pairs is not None:
        positions, planned = [int(i) for i in args.pairs.split(",")], ""
    else:
        spans, _ = flattener.plan_spans(remove=args.remove)
        spans = [(a, c) for a, c in spans if c > a]
        positions = [i for a, c in spans for i in range(a, c)]
        planned = f" The default plan for {args.remove} blocks: spans " + " ".join(f"{a}-{c}" for a, c in spans) + "."
    layers = flattener.arch.layers_of(model)
    dense = run.ppl(model)

    def ppl_with(i: int, blocks: list) -> float:
        with swapped_blocks(layers, i, i + 2, blocks):
            return run.ppl(model)

    rows = []
    for i, wide, merged in flattener.merges_in_isolation(positions):
        row = {"pair": f"{i}-{i + 1}", "flatten only": ppl_with(i, [wide]), "pruned merge": ppl_with(i, [merged]),
               "first block only": ppl_with(i, [layers[i]]), "second block only": ppl_with(i, [layers[i + 1]])}
        print(row, flush=True)
        rows.append(row)
    columns = ["flatten only", "pruned merge", "first block only", "second block only"]
    lines = [f"### {args.model}: each merge on its own ({date.today()})", "",
             f"Command: `python {' '.join(sys.argv)}` ({time.perf_counter() - start:.0f} s)", "",
             f"Machine: {machine()}", "",
             f"{run.protocol}{planned} Each row replaces one pair of the dense model (perplexity {dense:.2f}); the "
             "lowest of the three that remove a block in bold.", "",
             "| pair | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        best = min(row[c] for c in columns[1:])
        cells = [f"**{row[c]:.2f}**" if row[c] == best else f"{row[c]:.2f}" for c in columns]
        lines.append(f"| {row['pair']} | " + " | ".join(cells) + " |")
    publish(lines, args.append)


if __name__ == "__main__":
    main()
