"""Massive activations: how much of the residual stream's squared norm the first token of a sequence holds,
at the input of each block. Least-squares statistics summed over tokens (as the Flattener's are) are ruled
by such tokens when the share is large.

    python benchmarks/activations.py --model qwen2.5-coder-0.5b --samples 4
"""

from __future__ import annotations

import argparse
import sys

import torch

from flatten import load_model
from flatten.data import calibration_tokens
from flatten.evaluation.measure import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=4, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    ids = calibration_tokens(tokenizer, samples=args.samples, seq_len=args.seq_len)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    print(f"Command: `python {' '.join(sys.argv)}`\n\nMachine: {machine()}\n")
    print("| block input | first token's norm (mean) | median token norm | first token's share of the squared norm |")
    print("|---|---|---|---|")
    for block in range(model.config.num_hidden_layers):
        norms = hidden[block].norm(dim=-1)  # samples x tokens
        share = norms[:, 0].square().sum() / norms.square().sum()
        print(f"| {block} | {norms[:, 0].mean():.1f} | {norms.median():.1f} | {share:.3f} |")


if __name__ == "__main__":
    main()
