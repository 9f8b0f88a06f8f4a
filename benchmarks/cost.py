"""What compression costs: time as a multiple of one forward pass over the calibration set, and peak memory
against the budget of the method (``flatten.evaluation.measure.memory_budget``: one wide block, a few block boundaries'
activations, the statistics of one wide block and the workspace of its channel selection, every block's input
for one batch). Rows vary the calibration size (at the largest number of blocks removed) and the number of
blocks removed (at the largest calibration size); each row also gives the compressed model's WikiText-2
perplexity, so the calibration rows are the calibration-size ablation too.

    python benchmarks/cost.py --model smollm2-135m --samples 8,16,32 --remove 2,4,6 --append benchmarks/RESULTS.md

Prints a markdown section (command, machine, table); ``--append FILE`` also appends it to FILE.
"""

from __future__ import annotations

import argparse
import copy
import sys
from datetime import date

from flatten import Flattener
from flatten.evaluation.measure import machine, memory_budget
from flatten.run.pipeline import compress_timed
from harness import forward_seconds, publish, setup

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", default="8,16,32", help="calibration sizes (sequences), comma-separated")
    parser.add_argument("--remove", default="2,4,6", help="blocks to remove, comma-separated")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--windows", type=int, default=32, help="WikiText-2 test windows for perplexity")
    parser.add_argument("--append", default=None, help="append the markdown section to this file")
    args = parser.parse_args()
    samples = sorted(int(s) for s in args.samples.split(","))
    removes = sorted(int(k) for k in args.remove.split(","))
    runs = [(s, removes[-1]) for s in samples] + [(samples[-1], k) for k in removes[:-1]]

    run = setup(args.model, samples[-1], args.seq_len, args.windows)
    dense, calibration = run.model, run.calibration
    weights = sum(p.numel() * p.element_size() for p in dense.parameters())
    layers = dense.config.num_hidden_layers

    rows = []
    for s, k in runs:
        model = copy.deepcopy(dense)
        calib = calibration[:s]
        forward = forward_seconds(model, calib, args.batch_size)
        done = compress_timed(Flattener(model, calib, batch_size=args.batch_size, progress=False), k)
        plan, seconds = done.decisions, done.seconds
        budget = memory_budget(dense.config, s * args.seq_len, args.batch_size * args.seq_len,
                               next(dense.parameters()).element_size())
        phases = plan.method["seconds_by_phase"]
        top = sorted(phases, key=phases.get, reverse=True)[:3]
        rows.append((s * args.seq_len, k, run.ppl(model), forward, seconds, (done.peak_memory_bytes - done.baseline_memory_bytes) / MIB,
                     sum(budget.values()) / MIB, ", ".join(f"{p} {phases[p] / seconds:.0%}" for p in top)))
        print(rows[-1], flush=True)
        del model

    lines = [f"### {args.model}: cost of compression, {layers} blocks (dense weights {weights / MIB:.0f} MiB), "
             f"{date.today()}", "",
             "Command: `python " + " ".join(sys.argv) + "`", "", f"Machine: {machine()}", "",
             run.protocol + " A row with fewer calibration samples uses the first ones of that set.", "",
             "Forward: one pass of the original model over the same calibration set (batches of "
             f"{args.batch_size}, best of two). Extra memory: peak resident memory during `compress` minus that "
             "just before it (the model already loaded). Budget: `flatten.evaluation.measure.memory_budget`, the sum of one "
             "wide block, three block boundaries' activations, a wide block's statistics in float64 (attention "
             "and MLP Gram matrices, MLP cross term), the Cholesky factor and two 1,024-column blocks of channel "
             "selection, and every block's input for one batch (the similarity that plans the merges).", "",
             f"Dense perplexity: {run.ppl(dense):.2f}.", "",
             "| calibration tokens | removed | WikiText-2 ppl | forward s | compress s | compress / forward | extra memory MiB "
             "| budget MiB | where the time went |",
             "|---|---|---|---|---|---|---|---|---|"]
    for tokens, k, ppl, forward, seconds, extra, budget, where in rows:
        lines.append(f"| {tokens:,} | {k} | {ppl:.2f} | {forward:.1f} | {seconds:.1f} | {seconds / forward:.2f} | {extra:.0f} "
                     f"| {budget:.0f} | {where} |")
    publish(lines, args.append)


if __name__ == "__main__":
    main()
