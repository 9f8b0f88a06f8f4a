"""Inference speed-up of a depth-compressed model against the ideal for its share of time in decoder blocks.

Removing k of L blocks can at best save k/L of the time spent in blocks; the embedding, final norm and LM head
stay. With ``share`` the measured fraction of the original model's time spent in its blocks, the ideal
speed-up is ``1 / (1 - share * k / L)``. This script measures both, for prefill and decode (KV cache), at
several batch sizes, the two models' runs interleaved.

    python benchmarks/speedup.py --model smollm2-135m --remove 6 --batch 1,8 --append benchmarks/RESULTS.md
    python benchmarks/speedup.py --model smollm2-135m --compressed out/smollm2-24
    python benchmarks/speedup.py --config qwen2-config.json --device cuda --dtype bfloat16

``--config`` times a model of that ``config.json`` with random weights: latency does not depend on the weights,
so the speed-up of a model too large to bring along can be measured from its config alone.

Without ``--compressed``, the compressed model is the original with k evenly spaced blocks deleted: it has
the shape of every k-block compression (FlattenGPT's included), and latency does not depend on the weights.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from datetime import date

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flatten import architecture_for, load_model
from flatten.evaluation.latency import compare_latency, synchronize
from flatten.evaluation.measure import machine
from flatten.merge import remove_blocks, swapped_blocks
from flatten.models.loading import resolve_device
from harness import publish


@torch.inference_mode()
def outside_blocks_ms(model: torch.nn.Module, batch: int, tokens: int, repeats: int) -> float:
    """Median time of a forward pass over ``batch x tokens`` with every decoder block taken out: the
    embedding, final norm and LM head alone (a decode step is such a pass over one token)."""
    layers = architecture_for(model).layers_of(model)
    device = next(model.parameters()).device
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    times = []
    with swapped_blocks(layers, 0, len(layers), []):
        for _ in range(repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--config", default=None, help="a config.json: time a model of it with random weights")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--remove", type=int, default=6, help="blocks the compressed model lacks (without --compressed)")
    parser.add_argument("--compressed", default=None, help="a saved compressed model of --model")
    parser.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--append", default=None, help="append the markdown section to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    if args.config:
        config = AutoConfig.from_pretrained(args.config)
        original = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
        name = f"{config.model_type} of `{args.config}` (random weights)"
    else:
        original, _ = load_model(args.model, dtype=dtype, device=device)
        name = args.model
    if args.compressed:
        compressed, _ = load_model(args.compressed, dtype=dtype, device=device)
        what = f"`{args.compressed}`"
    else:
        count = original.config.num_hidden_layers
        drop = [round((i + 1) * count / (args.remove + 1)) - 1 for i in range(args.remove)]
        compressed = remove_blocks(copy.deepcopy(original), drop)
        what = f"the original without blocks {' '.join(map(str, drop))}"
    L, kept = original.config.num_hidden_layers, compressed.config.num_hidden_layers
    removed = (L - kept) / L

    lines = [f"### {name}: inference speed-up, {L} -> {kept} blocks ({date.today()})", "",
             "Command: `python " + " ".join(sys.argv) + "`", "", f"Machine: {machine()}", "",
             f"Compressed model: {what}. Weights {args.dtype} on {device}. Prompt {args.prompt} random tokens, then {args.new_tokens} greedy decode "
             f"steps with the KV cache; medians of {args.repeats} runs, original and compressed interleaved. "
             "Share in blocks: 1 - (time of the same pass with all blocks taken out) / (original's time). "
             f"Ideal speed-up: 1 / (1 - share x {L - kept}/{L}).", "",
             "| batch | phase | original ms | compressed ms | speed-up | share in blocks | ideal speed-up "
             "| speed-up / ideal |", "|---|---|---|---|---|---|---|---|"]
    for batch in (int(b) for b in args.batch.split(",")):
        before, after = compare_latency([original, compressed], batch=batch, prompt=args.prompt,
                                        new_tokens=args.new_tokens, repeats=args.repeats)
        for phase, a, b, tokens in (("prefill", before.prefill_ms, after.prefill_ms, args.prompt),
                                    ("decode (per token)", before.decode_ms, after.decode_ms, 1)):
            share = 1 - outside_blocks_ms(original, batch, tokens, args.repeats) / a
            ideal = 1 / (1 - share * removed)
            lines.append(f"| {batch} | {phase} | {a:.2f} | {b:.2f} | {a / b:.3f} | {share:.3f} | {ideal:.3f} "
                         f"| {a / b / ideal:.3f} |")
            print(lines[-1], flush=True)
    publish(lines, args.append)


if __name__ == "__main__":
    main()
