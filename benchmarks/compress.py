"""Compress a real model with FlattenGPT and measure it: perplexity, time, peak memory, every scorer and policy.

    python benchmarks/compress.py --model smollm2-135m --remove 6 --all --append benchmarks/RESULTS.md
    python benchmarks/compress.py --model qwen2.5-coder-0.5b --remove 5 --scorers flattengpt+o+seq,flattengpt \
        --save out/qwen-19 --append benchmarks/RESULTS.md

Prints a markdown section (command, machine, protocol, table); ``--append FILE`` also appends it to FILE.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from datetime import date

from flatten import Flattener, count_parameters, save_checkpoint
from flatten.criteria import POLICIES, SCORERS, FixedSpans
from flatten.evaluation.measure import machine
from flatten.run.pipeline import compress_timed
from harness import publish, setup

GIB = 2**30


def upper_pairs(layers: int, remove: int) -> list[tuple[int, int]]:
    """``remove`` adjacent pairs among the upper blocks, below the last one (a fixed-spans baseline)."""
    first = layers - 1 - 2 * remove
    return [(first + 2 * i, first + 2 * i + 1) for i in range(remove)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", type=int, required=True)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32, help="WikiText-2 test windows for perplexity")
    parser.add_argument("--scorers", default="flattengpt", help="comma-separated scorers; the first is the main row")
    parser.add_argument("--all", action="store_true", help="also every registered scorer, policy and similarity")
    parser.add_argument("--save", default=None, help="save the main compressed model here and reload it in a new process")
    parser.add_argument("--append", default=None, help="append the markdown section to this file")
    args = parser.parse_args()

    run = setup(args.model, args.samples, args.seq_len, args.windows)
    model, tokenizer, calibration, ppl = run.model, run.tokenizer, run.calibration, run.ppl
    layers = model.config.num_hidden_layers

    scorers = args.scorers.split(",")
    main_scorer = scorers[0]
    if args.all:
        scorers += [s for s in SCORERS.names() if s not in scorers]
    configs = [(s, "greedy", "cosine") for s in scorers]
    if args.all:
        configs += [(main_scorer, p, "cosine") for p in POLICIES.names() if p != "greedy"]
        configs += [(main_scorer, "greedy", "angular")]

    rows = [("dense", "", "", layers, count_parameters(model), ppl(model), None, None, "")]
    print(f"dense perplexity {rows[0][5]:.2f}", flush=True)
    for scorer, policy_name, similarity in configs:
        work = copy.deepcopy(model) if len(configs) > 1 else model
        policy = FixedSpans(upper_pairs(layers, args.remove)) if policy_name == "fixed" else policy_name
        done = compress_timed(Flattener(work, calibration, scorer=scorer, policy=policy, similarity=similarity),
                              args.remove)
        compressed, plan, seconds = done.model, done.decisions, done.seconds
        spans = " ".join(f"{a}-{c}" for a, c in plan.spans)
        rows.append((scorer, policy_name, similarity, len(compressed.model.layers), count_parameters(compressed),
                     ppl(compressed), seconds, done.peak_memory_bytes, spans))
        print(rows[-1], flush=True)
        if args.save and (scorer, policy_name, similarity) == configs[0]:
            save_checkpoint(compressed, args.save, tokenizer, overwrite=True)
            plan.save(f"{args.save}/plan.json")
        if work is not model:
            del work, compressed

    lines = [f"### {args.model}: remove {args.remove} of {layers} blocks ({date.today()})", "",
             f"Command: `python {' '.join(sys.argv)}`", "", f"Machine: {machine()}", "",
             f"{run.protocol} "
             "Peak memory: resident set of the process "
             "during compression (it holds the dense model for every row too).", "",
             "| scorer | policy | similarity | layers | parameters | WikiText-2 ppl | compress s | peak RSS GiB | spans |",
             "|---|---|---|---|---|---|---|---|---|"]
    for scorer, policy, similarity, n, params, value, seconds, peak, spans in rows:
        lines.append(f"| {scorer} | {policy} | {similarity} | {n} | {params:,} | {value:.2f} | "
                     f"{'' if seconds is None else f'{seconds:.1f}'} | {'' if peak is None else f'{peak / GIB:.2f}'} | {spans} |")
    if args.save:
        reload = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
                  "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32); "
                  "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
                  "ids = t('def fibonacci(n):', return_tensors='pt').input_ids; "
                  "print(m.config.num_hidden_layers, repr(t.decode(m.generate(ids, max_new_tokens=24, do_sample=False)[0])))")
        out = subprocess.run([sys.executable, "-c", reload, args.save], capture_output=True, text=True, check=True)
        lines += ["", f"Saved to `{args.save}`; reloaded with stock `AutoModelForCausalLM` in a new process "
                      f"(layers, greedy text): `{out.stdout.strip()}`"]
    publish(lines, args.append)


if __name__ == "__main__":
    main()
