"""Compression with bf16 weights against the same compression in fp32 (statistics accumulate in fp64 in both).

    python benchmarks/numerics.py --model smollm2-135m --remove 6

Compresses a float32 and a bfloat16 copy of the model on the same calibration tokens and compares what they
decided (spans, KV groups, MLP channels) and their WikiText-2 perplexity. The bf16 result is evaluated in
bf16, so it is set against the fp32 result cast to bf16 (the same inference rounding) as well as the fp32
result itself. Checks: the same spans and KV groups, at least ``--channels`` of the MLP channels shared, and
a perplexity within ``--ppl-tolerance`` (relative) of the fp32 result cast to bf16; exit status 1 if one fails.
"""

from __future__ import annotations

import argparse
import copy
import sys
from datetime import date

import torch

from flatten import Flattener
from flatten.evaluation.measure import machine
from flatten.run.pipeline import compress_timed
from harness import plan_agreement, publish, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", type=int, default=6)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32, help="WikiText-2 test windows for perplexity")
    parser.add_argument("--channels", type=float, default=0.95, help="least share of MLP channels both runs keep")
    parser.add_argument("--ppl-tolerance", type=float, default=0.02, help="largest relative perplexity difference")
    parser.add_argument("--append", default=None, help="append the markdown section to this file")
    args = parser.parse_args()

    run = setup(args.model, args.samples, args.seq_len, args.windows)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(run.model).to(dtype)
        done = compress_timed(Flattener(model, run.calibration), args.remove)
        results[dtype] = (done.model, done.decisions, done.seconds)
    (full, plan32, seconds32), (half, plan16, seconds16) = results[torch.float32], results[torch.bfloat16]
    ppl32, ppl16 = run.ppl(full), run.ppl(half)
    ppl32_cast = run.ppl(copy.deepcopy(full).to(torch.bfloat16))

    checks, shared = plan_agreement(plan32, plan16, args.channels)
    difference = (ppl16 - ppl32_cast) / ppl32_cast
    checks[f"perplexity within {args.ppl_tolerance:.0%} of fp32 cast to bf16"] = abs(difference) <= args.ppl_tolerance
    lines = [f"### {args.model}: bf16 weights against fp32, {args.remove} blocks removed ({date.today()})", "",
             f"Command: `python {' '.join(sys.argv)}`", "", f"Machine: {machine()}", "", run.protocol, "",
             "| weights | spans | compress s | WikiText-2 ppl |", "|---|---|---|---|",
             f"| float32 | {plan32.describe()} | {seconds32:.1f} | {ppl32:.3f} |",
             f"| float32 result, cast to bfloat16 | | | {ppl32_cast:.3f} |",
             f"| bfloat16 | {plan16.describe()} | {seconds16:.1f} | {ppl16:.3f} |", "",
             f"Fewest MLP channels shared by the two runs at one merge: {shared:.1%}; bf16 perplexity against the "
             f"fp32 result cast to bf16: {difference:+.2%} (relative).", "",
             "Checks: " + "; ".join(f"{name}: {'passed' if ok else 'FAILED'}" for name, ok in checks.items()) + "."]
    publish(lines, args.append)
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
