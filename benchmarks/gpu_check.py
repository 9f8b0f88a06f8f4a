"""GPU check, to run as is on a CUDA machine: compress each model on the GPU and on the CPU, time both, and
check that the GPU result agrees with the CPU one (same spans, KV groups and nearly the same MLP channels;
perplexity within a tolerance).

    python benchmarks/gpu_check.py                                  # smollm2-135m and qwen2.5-coder-0.5b
    python benchmarks/gpu_check.py --models smollm2-135m --samples 8 --device cpu   # the script itself, on CPU

The model's weights stay on the CPU in both runs; with ``--device cuda`` only the block in hand and one block
boundary's activations visit the GPU (``Flattener(device=...)``). Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from flatten import Flattener
from flatten.evaluation.measure import machine
from flatten.run.pipeline import compress_timed
from harness import forward_seconds, plan_agreement, setup


def compress(model, calibration, remove: int, device: str, resident: bool = False):
    """Compress a copy of ``model`` on ``device``: its weights stay on the CPU and each block visits the
    device in turn, or, ``resident``, the whole model is moved there first."""
    model = copy.deepcopy(model)
    if resident:
        model.to(device)
    done = compress_timed(Flattener(model, calibration, device=device, progress=False), remove)
    return done.model.cpu(), done.decisions, done.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    parser.add_argument("--fraction", type=float, default=0.2, help="fraction of the blocks to remove")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows for perplexity (on CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--channels", type=float, default=0.95, help="least share of MLP channels both runs keep")
    parser.add_argument("--ppl-tolerance", type=float, default=0.02, help="largest relative perplexity difference")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run this on a GPU machine, or pass --device cpu to try the script itself")
    print(machine())
    failures = []
    for name in args.models.split(","):
        run = setup(name, args.samples, args.seq_len, args.windows)
        remove = max(1, round(args.fraction * run.model.config.num_hidden_layers))
        on_cpu, cpu_plan, cpu_seconds = compress(run.model, run.calibration, remove, "cpu")
        on_device, device_plan, device_seconds = compress(run.model, run.calibration, remove, args.device)
        _, resident_plan, resident_seconds = compress(run.model, run.calibration, remove, args.device, resident=True)
        forward = forward_seconds(copy.deepcopy(run.model).to(args.device), run.calibration, batch_size=4)
        cpu_ppl, device_ppl = run.ppl(on_cpu), run.ppl(on_device)
        print(f"{name}: remove {remove}; compress {cpu_seconds:.1f} s on cpu, {device_seconds:.1f} s on "
              f"{args.device} ({cpu_seconds / device_seconds:.1f}x); one forward pass of the whole model on "
              f"{args.device} over the calibration set {forward:.2f} s (compress / forward "
              f"{device_seconds / forward:.1f}); perplexity {cpu_ppl:.3f} vs {device_ppl:.3f}", flush=True)
        print(f"  seconds by phase on {args.device}: {device_plan.method['seconds_by_phase']}; with the whole "
              f"model on {args.device}: {resident_seconds:.1f} s, {resident_plan.method['seconds_by_phase']}")
        checks, _ = plan_agreement(cpu_plan, device_plan, args.channels)
        checks[f"perplexity within {args.ppl_tolerance:.0%}"] = abs(device_ppl / cpu_ppl - 1) <= args.ppl_tolerance
        for check, passed in checks.items():
            print(f"  {'ok  ' if passed else 'FAIL'} {check}")
            if not passed:
                failures.append(f"{name}: {check}")
    if failures:
        sys.exit("failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
