"""Demo of the flattening kernel on a real model (the README's first command).

Flattens one adjacent pair of blocks of SmolLM2-135M into one wide block (no pruning) and compares the
perplexity with the dense model and with simply dropping the pair's second block.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from flatten.architectures import architecture_for
from flatten.data import LINE_JOIN, read_lines, tokenize, wikitext2_test_path
from flatten.evaluation import perplexity
from flatten.merge import replace_span
from flatten.models import SMOLLM2, count_parameters, load_model
from flatten.pair import BlockPair


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flatten.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SMOLLM2, help="embedded model name, folder, hub id or .gguf file")
    parser.add_argument("--pair", type=int, default=None, help="index of the pair's first block (default: 2/3 depth)")
    parser.add_argument("--text", default=None, help="perplexity text (default: WikiText-2 test beside the project)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args(argv)

    text_path = args.text or wikitext2_test_path()
    if text_path is None:
        parser.error("no WikiText-2 test file at ../shared/data/wikitext-2-raw/wiki.test.raw; pass --text FILE")
    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s")
    layers = architecture_for(model).layers_of(model)
    index = args.pair if args.pair is not None else (2 * len(layers)) // 3
    ids = tokenize(tokenizer, read_lines(text_path), max_tokens=args.windows * args.seq_len)

    def ppl(m):
        return perplexity(m, ids, seq_len=args.seq_len, max_windows=args.windows, text=str(text_path))

    rows = [("dense", model, ppl(model))]

    flattened = copy.deepcopy(model)
    pair = BlockPair(flattened, index)
    start = time.perf_counter()
    pair.replace(pair.flatten())
    flatten_s = time.perf_counter() - start
    rows.append((f"flatten blocks {index}+{index + 1} (wide block, no pruning)", flattened, ppl(flattened)))

    dropped = copy.deepcopy(model)
    replace_span(dropped, index, index + 2, architecture_for(dropped).layers_of(dropped)[index])
    rows.append((f"drop block {index + 1}", dropped, ppl(dropped)))

    dense = rows[0][2].value
    print(f"\nperplexity: {rows[0][2].windows} windows x {args.seq_len} tokens of {text_path}, "
          f"lines joined by {LINE_JOIN!r}")
    print(f"{'model':<50} {'layers':>6} {'params':>12} {'perplexity':>11} {'vs dense':>9}")
    for name, m, result in rows:
        print(f"{name:<50} {len(architecture_for(m).layers_of(m)):>6} {count_parameters(m):>12,} "
              f"{result.value:>11.2f} {result.value / dense:>8.3f}x")
    print(f"\nflattening one pair took {flatten_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
