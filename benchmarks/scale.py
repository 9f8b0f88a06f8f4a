"""What compression costs at scale: a model of a named shape (LLaMA-2-7B, Llama-3-8B, Qwen2.5-32B, LLaMA-2-70B)
with random weights, compressed on one device, against one forward pass over the same calibration set.

    python benchmarks/scale.py --shape llama-3-8b --dtype bfloat16 --device cuda          # whole model on the GPU
    python benchmarks/scale.py --shape qwen2.5-32b --dtype bfloat16 --placement streamed   # weights in CPU memory
    python benchmarks/scale.py --shape llama-2-7b --method replaceme --remove 7 --json out/scale-7b.json
    python benchmarks/scale.py --shape llama-3-8b --scale-width 0.0625 --layers 6 --samples 4 --seq-len 64 \\
        --remove 1 --dtype bfloat16 --device cpu                                           # smoke run on a CPU

No hub: the shape's config is written here and the model is built on the ``meta`` device, then materialised
in ``--dtype`` where its weights are to live (``to_empty``) and filled with random numbers (normal, std 0.02,
as transformers initialises; norms 1, biases 0): never a float32 copy of a bf16 model. Time and memory do not
depend on the weights' values. ``--layers`` sets the depth; ``--scale-width F`` keeps the head size (128) and
scales the number of heads, KV heads, hidden size and MLP width by F (the vocabulary stays the shape's own).

``--placement resident``: the whole model on ``--device``, compressed where it is. ``streamed``: the weights
in CPU memory, ``Flattener(..., device=DEVICE)`` (any strategy's ``device``) computes block by block on the
device. ``dispatched``: accelerate's hooks (``dispatch_model``) keep every other block in CPU memory and the
rest of the model on ``--device``, where everything computes (``--device-map auto`` over a GPU too small for
the model). The forward pass is timed the same way: resident and dispatched, ``model(input_ids=...)`` per batch; streamed, layer
by layer as the strategies compute (every block visits the device once and runs all batches; then the final
norm and the LM head), the least a streamed pass over the calibration set costs. One warm-up batch, then the
best of ``--repeats``. Peak memory is ``torch.cuda.max_memory_allocated`` during the compression on CUDA;
on the CPU, the process's peak resident memory over its whole life (``getrusage``: building and the forward
pass included). The budget is ``flatten.evaluation.measure.memory_budget`` (what the device needs besides the weights it
holds); the goal is 1.25 x the weights on the device plus that budget (issue 26).

Prints the command, the machine, a markdown table of the run and one of the seconds by phase that the
Flattener records (``plan.method["seconds_by_phase"]``, the project's ``Stopwatch``, synchronised with the
device at each phase's start and end, so that a phase is charged with the GPU work it queued). Exit status 1 if the compressed model's weights changed dtype or left where they lived.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

from flatten import build_strategy
from flatten.calibration import capture, on_device, run_block
from flatten.evaluation.latency import synchronize
from flatten.evaluation.measure import Stopwatch, machine, memory_budget
from flatten.models.architectures import architecture_for
from flatten.models.loading import count_parameters, resolve_device
from flatten.strategies.compressor import DEFAULT_RECIPE
from harness import code_version

GIB = 2**30
HEAD_DIM = 128
STD = 0.02  # transformers' initializer_range for these families

# name -> (model_type, config fields); each shape's published config (attention: heads of 128)
SHAPES = {
    "llama-2-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)),
    "qwen2.5-32b": ("qwen2", dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                                  num_key_value_heads=8, intermediate_size=27648, vocab_size=152064,
                                  max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0)),
    "llama-2-70b": ("llama", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                  num_key_value_heads=8, intermediate_size=28672, vocab_size=32000,
                                  max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def shape_config(shape: str, layers: int | None = None, width: float = 1.0):
    """The transformers config of ``shape``, ``layers`` deep (default: the shape's own), its heads, KV heads
    and MLP width scaled by ``width`` (head size kept; KV heads lowered until they divide the heads)."""
    from transformers import LlamaConfig, Qwen2Config

    model_type, fields = SHAPES[shape]
    fields = dict(fields)
    if layers is not None:
        fields["num_hidden_layers"] = layers
    if width != 1.0:
        heads = max(1, round(fields["num_attention_heads"] * width))
        kv = max(1, min(heads, round(fields["num_key_value_heads"] * width)))
        while heads % kv:
            kv -= 1
        fields.update(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=heads * HEAD_DIM,
                      intermediate_size=max(1, round(fields["intermediate_size"] * width)))
    fields.update(head_dim=HEAD_DIM, tie_word_embeddings=False, initializer_range=STD)
    config = (LlamaConfig if model_type == "llama" else Qwen2Config)(**fields)  # Qwen2: q/k/v with biases
    return config


@torch.no_grad()
def build_model(config, dtype: torch.dtype, home: torch.device, init_device: torch.device, seed: int) -> nn.Module:
    """The model of ``config`` with random weights in ``dtype`` on ``home``: built on ``meta``, materialised
    there empty, then filled tensor by tensor (random numbers drawn on ``init_device``, e.g. the GPU for
    weights that live in CPU memory, which is faster than drawing them on the CPU)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.to_empty(device=home)
    generator = torch.Generator(device=init_device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        elif p.device == init_device:
            p.normal_(0.0, STD, generator=generator)
        else:
            p.copy_(torch.empty(p.shape, dtype=p.dtype, device=init_device).normal_(0.0, STD, generator=generator))
    # non-persistent buffers (RoPE frequencies) hold garbage after to_empty: compute them again, in float32
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            with torch.device(home):
                fresh = type(module)(config=model.config)
            model.set_submodule(name, fresh)
    return model.eval()


def dispatch(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` (in CPU memory) behind accelerate's hooks: the odd blocks offloaded to CPU memory, the rest
    moved to ``device``, all computing on ``device``."""
    from accelerate import dispatch_model

    arch = architecture_for(model)
    base = arch.layers.rsplit(".", 1)[0]
    device_map = {f"{base}.{name}": device.index for name, _ in model.get_submodule(base).named_children()
                  if f"{base}.{name}" != arch.layers}
    device_map.update({name: device.index for name, _ in model.named_children() if name != base.split(".")[0]})
    device_map.update({f"{arch.layers}.{i}": "cpu" if i % 2 else device.index
                       for i in range(len(arch.layers_of(model)))})
    model = dispatch_model(model, device_map, main_device=device)
    model.hf_device_map = device_map  # as transformers records it
    return model


def weight_bytes(model: nn.Module, device: torch.device | None = None) -> int:
    """Bytes of the model's weights (those on ``device`` only, if given)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
               if device is None or p.device == device)


@torch.no_grad()
def forward_resident(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> None:
    for ids in batches:
        model(input_ids=ids.to(device), use_cache=False)


@torch.no_grad()
def forward_streamed(model: nn.Module, batches: list[torch.Tensor], device: torch.device,
                     blocks: int | None = None) -> None:
    """One pass layer by layer, as the strategies compute: the embeddings where the model is, every block
    (or the first ``blocks``) on ``device`` over all batches in turn, then the final norm and the LM head."""
    arch = architecture_for(model)
    layers = arch.layers_of(model)
    inputs = capture(model, arch, batches).to(device)
    hidden = inputs.hidden
    for i, layer in enumerate(layers[:blocks]):
        with on_device(layer, device):
            hidden = run_block(layer, hidden, inputs.calls[i], name=f"block {i}")
    norm, head = model.get_submodule(arch.layers.rsplit(".", 1)[0]).norm, model.get_output_embeddings()
    with on_device(norm, device), on_device(head, device):
        for h in hidden:
            head(norm(h))


def forward_seconds(model: nn.Module, calibration: torch.Tensor, batch_size: int, device: torch.device,
                    streamed: bool, repeats: int) -> float:
    """One forward pass over the calibration set: a warm-up batch (streamed: through the first block only),
    then the best of ``repeats`` passes."""
    batches = list(calibration.split(batch_size))
    if streamed:
        forward_streamed(model, [calibration[:1]], device, blocks=1)
    else:
        forward_resident(model, [calibration[:1]], device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        (forward_streamed if streamed else forward_resident)(model, batches, device)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated since the last reset on CUDA; else the process's lifetime peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default: the shape's own)")
    parser.add_argument("--scale-width", type=float, default=1.0, metavar="F",
                        help="scale heads, KV heads, hidden size and MLP width by F (e.g. 0.125 for a CPU smoke run)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="auto", help="where blocks are computed: auto, cpu, cuda, cuda:N")
    parser.add_argument("--placement", choices=("resident", "streamed", "dispatched"), default="resident",
                        help="resident: the whole model on --device; streamed: weights in CPU memory, blocks "
                             "computed on --device one at a time; dispatched: accelerate's hooks, every other "
                             "block in CPU memory")
    parser.add_argument("--method", default=DEFAULT_RECIPE,
                        help=f"strategy, NAME:key=value:... (default {DEFAULT_RECIPE}, the library's default)")
    parser.add_argument("--remove", type=int, default=None, help="blocks to remove (default: about 22%%)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="forward passes timed (the best counts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show the strategy's progress bar")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the row as JSON here")
    args = parser.parse_args()
    if not 0 < args.scale_width <= 1:
        parser.error("--scale-width must be in (0, 1]")

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    streamed, dispatched = args.placement == "streamed", args.placement == "dispatched"
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if dispatched and device.type != "cuda":
        parser.error("--placement dispatched needs a CUDA --device")
    home = torch.device("cpu") if streamed or dispatched else device
    config = shape_config(args.shape, args.layers, args.scale_width)
    layers = config.num_hidden_layers
    remove = args.remove if args.remove is not None else max(1, min(layers - 1, round(0.22 * layers)))
    shape = args.shape + (f" x{args.scale_width:g} width" if args.scale_width != 1 else "") + \
        (f", {layers} layers" if args.layers is not None else "")

    print("Command: `python " + shlex.join(sys.argv) + "`")
    print(f"Machine: {machine()}")
    version = code_version()
    print(f"Code: {version['commit'] or 'not a git work tree'}" + (" (with local changes)" if version["dirty"] else ""))

    start = time.perf_counter()
    model = build_model(config, dtype, home, device, args.seed)
    if dispatched:
        model = dispatch(model, device)
    synchronize(device)
    built = time.perf_counter() - start
    weights, weights_on_device = weight_bytes(model), weight_bytes(model, device)
    parameters = count_parameters(model)
    print(f"Model: {shape}: hidden {config.hidden_size}, {config.num_attention_heads} heads / "
          f"{config.num_key_value_heads} KV heads of {HEAD_DIM}, MLP {config.intermediate_size}, vocabulary "
          f"{config.vocab_size}; {parameters / 1e9:.3f} B parameters, {weights / GIB:.2f} GiB in {args.dtype}, "
          f"{weights_on_device / GIB:.2f} GiB of it on {device} (built in {built:.1f} s)", flush=True)

    calibration = torch.randint(0, config.vocab_size, (args.samples, args.seq_len),
                                generator=torch.Generator().manual_seed(args.seed))
    reset_peak(device)
    forward = forward_seconds(model, calibration, args.batch_size, device, streamed, args.repeats)
    forward_peak = peak_bytes(device)
    print(f"Forward: {forward:.2f} s", flush=True)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    Stopwatch.synchronize = lambda: synchronize(device)
    strategy = build_strategy(args.method, model, calibration, batch_size=args.batch_size,
                              progress=args.progress, **({"device": device} if streamed else {}))
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    model, record = strategy.compress(remove=remove)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = peak_bytes(device)

    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    devices = sorted({str(p.device) for p in model.parameters()})
    kept_dtype = dtypes == [args.dtype]
    homes = {device, torch.device("meta")} if dispatched else {home}  # offloaded weights: meta behind hooks
    kept_place = all(torch.device(d) in homes for d in devices)
    budget = sum(memory_budget(config, args.samples * args.seq_len, args.batch_size * args.seq_len,
                               dtype.itemsize).values())
    goal = 1.25 * weights_on_device + budget
    phases = record.method.get("seconds_by_phase")
    row = {
        "shape": shape, "layers": layers, "parameters": parameters, "dtype": args.dtype, "placement": args.placement,
        "device": str(device), "method": args.method, "removed": remove,
        "layers_after": len(architecture_for(model).layers_of(model)),
        "calibration": f"{args.samples} x {args.seq_len}", "batch_size": args.batch_size,
        "forward_s": round(forward, 3), "compress_s": round(seconds, 3), "ratio": round(seconds / forward, 2),
        "peak_kind": "cuda max_memory_allocated during compress" if device.type == "cuda"
        else "process peak RSS over its life (getrusage)",
        "peak_bytes": peak, "forward_peak_bytes": forward_peak, "weight_bytes": weights,
        "weight_bytes_on_device": weights_on_device,
        "peak_over_weights": round(peak / weights, 2), "budget_bytes": budget, "goal_bytes": int(goal),
        "dtypes_after": dtypes, "devices_after": devices, "seconds_by_phase": phases,
        "record_seconds": record.method.get("seconds"),
        "command": "python " + shlex.join(sys.argv), "machine": machine(), "code": version, "date": str(date.today()),
    }

    peak_label = "peak GiB (CUDA, compress)" if device.type == "cuda" else "peak GiB (RSS, whole process)"
    print()
    print(f"| shape | dtype | placement | device | method | removed | compress s | forward s | compress / forward "
          f"| {peak_label} | weights GiB | peak / weights | budget GiB | goal GiB | dtype after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {shape} ({parameters / 1e9:.2f} B) | {args.dtype} | {args.placement} | {device} | {args.method} "
          f"| {remove} of {layers} | {seconds:.2f} | {forward:.2f} | {seconds / forward:.2f} | {peak / GIB:.2f} "
          f"| {weights / GIB:.2f} | {peak / weights:.2f} | {budget / GIB:.2f} | {goal / GIB:.2f} "
          f"| {', '.join(dtypes)} |")
    print()
    if phases:
        print("| phase | seconds | share of compress |")
        print("|---|---|---|")
        for phase, s in sorted(phases.items(), key=lambda item: -item[1]):
            print(f"| {phase} | {s:.2f} | {s / seconds:.0%} |")
        rest = seconds - sum(phases.values())
        print(f"| (outside the phases) | {rest:.2f} | {rest / seconds:.0%} |")
    else:
        found = {k: v for k, v in record.method.items() if k in ("seconds", "strategy", "tokens", "ridge",
                                                                 "search_samples")}
        print(f"No phases recorded by {args.method}; its record: {found}")
    print()
    print(f"Weights after: dtype {', '.join(dtypes)} (given {args.dtype}), on {', '.join(devices)} (lived on {home}); "
          f"{row['layers_after']} blocks. Forward peak: {forward_peak / GIB:.2f} GiB.")

    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=1) + "\n")
        print(f"Wrote {path}")
    failures = ([f"the weights are {', '.join(dtypes)}, not {args.dtype}"] if not kept_dtype else []) + \
        ([f"the weights are on {', '.join(devices)}, not {', '.join(map(str, homes))}"] if not kept_place else [])
    if failures:
        print("FAIL: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
