"""A model larger than the memory it is compressed in: weights stay on disk, memory-mapped, and page in block by block.

A checkpoint folder of safetensors loaded by ``flatten.load_model`` in its stored dtype keeps its weights as
memory-mapped file pages (transformers maps safetensors files), which the kernel reads in when a block is used
and may drop again: the Flattener touches one block (or one wide block) at a time, so the process needs
memory for that block, the statistics and activations, and the new blocks, not for the model. This script
shows it on the CPU by capping the memory of a process (a Linux memory cgroup, v1 or v2; needs root) below
the size of the model, and checks that the capped run writes exactly the weights of an uncapped one.

    python benchmarks/offload.py                       # SmolLM2-135M's shape at 120 blocks (1.7 GiB), cap 1.25 GiB
    python benchmarks/offload.py --layers 60 --cap-mib 700 --append benchmarks/RESULTS.md
    python benchmarks/offload.py --device-map-mib 256  # capped run dispatched by accelerate instead: blocks
                                                       # beyond 256 MiB of CPU memory offloaded to disk

With ``--device-map-mib``, the capped run loads the model with ``device_map="auto"`` and that much CPU memory
(``max_memory``), as a user with a model larger than their GPUs and memory would; it is compared with the
uncapped memory-mapped run.

The model is SmolLM2-135M's architecture made deeper, with random weights (this machine has no model larger
than its memory; memory and time do not depend on the weights' values), built once into ``out/offload/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "configs" / "smollm2-135m"


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (not Linux?)")


def build(folder: Path, layers: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from flatten import load_model, save_checkpoint

    _, tokenizer = load_model("smollm2-135m")
    config = AutoConfig.from_pretrained(CONFIG)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    save_checkpoint(AutoModelForCausalLM.from_config(config, dtype=torch.float32), folder, tokenizer, overwrite=True)


def child(folder: str, out: str, remove: int, samples: int, seq_len: int, mapped_allocations: bool,
          device_map_mib: int | None) -> None:
    """Load, compress and save; print one JSON line with peak anonymous memory and timings."""
    from flatten import Flattener, load_model, save_checkpoint
    from flatten.evaluation.measure import file_backed_fraction
    from flatten.models.loading import map_large_allocations

    if mapped_allocations:
        map_large_allocations()

    peak, running = [rss_anon_bytes()], True

    def sample():
        while running:
            peak[0] = max(peak[0], rss_anon_bytes())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    if device_map_mib is None:
        model, _ = load_model(folder, dtype="auto")
    else:
        model, _ = load_model(folder, dtype="auto", device_map="auto", max_memory={"cpu": f"{device_map_mib}MiB"},
                              offload_folder=Path(out).parent / "offload-folder")
    on_disk = sum(v == "disk" for k, v in getattr(model, "hf_device_map", {}).items() if k.startswith("model.layers."))
    mapped = file_backed_fraction(model)
    calibration = torch.randint(model.config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    loaded = time.perf_counter()
    model, plan = Flattener(model, calibration, batch_size=1, progress=False).compress(remove=remove)
    compressed = time.perf_counter()
    save_checkpoint(model, out, overwrite=True)
    running = False
    print(json.dumps({"peak_anon": max(peak[0], rss_anon_bytes()), "mapped": mapped, "on_disk": on_disk,
                      "load_s": loaded - start,
                      "compress_s": compressed - loaded, "save_s": time.perf_counter() - compressed,
                      "spans": [m.span for m in plan.merges]}))


def memory_cgroup(name: str, cap: int) -> tuple[Path, Path]:
    """A memory cgroup capped at ``cap`` bytes: (its folder, the file that holds its peak usage)."""
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").is_file():
        folder = v2 / name
        folder.mkdir(exist_ok=True)
        (folder / "memory.max").write_text(str(cap))
        (folder / "memory.swap.max").write_text("0")
        return folder, folder / "memory.peak"
    folder = Path("/sys/fs/cgroup/memory") / name
    folder.mkdir(exist_ok=True)
    (folder / "memory.limit_in_bytes").write_text(str(cap))
    (folder / "memory.max_usage_in_bytes").write_text("0")
    return folder, folder / "memory.max_usage_in_bytes"


def run(args, folder: Path, out: Path, cgroup: Path | None = None, mapped_allocations: bool = True,
        device_map_mib: int | None = None) -> dict:
    def join():
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    command = [sys.executable, __file__, "--child", str(folder), str(out), "--remove", str(args.remove),
               "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    command += ["--mapped-allocations"] if mapped_allocations else []
    command += ["--device-map-mib", str(device_map_mib)] if device_map_mib else []
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=join if cgroup else None,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if done.returncode != 0:
        code = done.returncode
        failed = f"exit status {code}" if code > 0 else f"killed by signal {-code}" + (" (out of memory)" if code == -9 else "")
        return {"failed": failed, "stderr": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=120, help="blocks of the deepened SmolLM2-135M")
    parser.add_argument("--remove", type=int, default=24)
    parser.add_argument("--cap-mib", type=int, default=1280, help="memory cap of the capped run (MiB)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device-map-mib", type=int, default=None, metavar="MIB",
                        help="make the capped run one dispatched by accelerate with this much CPU memory (see above)")
    parser.add_argument("--append", default=None, help="append the markdown section to this file")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--mapped-allocations", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.remove, args.samples, args.seq_len, args.mapped_allocations, args.device_map_mib)

    sys.path.insert(0, str(ROOT / "src"))
    from flatten.evaluation.measure import machine
    from flatten.files import tensors_sha256
    from harness import publish
    from safetensors import safe_open

    base = ROOT / "out" / "offload"
    folder = base / f"smollm2-shape-{args.layers}-blocks"
    if not (folder / "config.json").is_file():
        print(f"building {folder} ...", flush=True)
        build(folder, args.layers)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    cap = args.cap_mib << 20
    if cap >= size:
        sys.exit(f"--cap-mib {args.cap_mib} is not below the model's {size >> 20} MiB: nothing would be shown")
    try:
        cgroup, peak_file = memory_cgroup("flatten-offload", cap)
    except OSError as error:
        sys.exit(f"cannot create a memory cgroup here ({error}): run as root on Linux with cgroups mounted")

    def digest(out: Path) -> str:
        named = []
        for file in sorted(out.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                named += [(k, f.get_tensor(k)) for k in sorted(f.keys())]
        return tensors_sha256(named)

    if args.device_map_mib:
        runs = {"uncapped, `map_large_allocations()`": run(args, folder, base / "uncapped"),
                f"capped at {args.cap_mib} MiB, `device_map=\"auto\"` with {args.device_map_mib} MiB of CPU memory, "
                "the rest offloaded to disk": run(args, folder, base / "capped", cgroup, device_map_mib=args.device_map_mib)}
        outputs = ("uncapped", "capped")
    else:
        runs = {"uncapped, glibc's default allocation": run(args, folder, base / "default", mapped_allocations=False),
                "uncapped, `map_large_allocations()`": run(args, folder, base / "uncapped"),
                f"capped at {args.cap_mib} MiB, `map_large_allocations()`": run(args, folder, base / "capped", cgroup)}
        outputs = ("default", "uncapped", "capped")
    cgroup_peak = int(peak_file.read_text())
    same = all("failed" not in r for r in runs.values()) and len({digest(base / name) for name in outputs}) == 1

    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    lines = [f"### Compressing a model larger than the process's memory ({date.today()})", "",
             "Command: `python " + " ".join(sys.argv) + "`", "", f"Machine: {machine()}", "",
             f"Model: SmolLM2-135M's architecture at {args.layers} blocks, random weights, float32, "
             f"{mib(size)} MiB of safetensors; remove {args.remove} blocks; calibration {args.samples} x "
             f"{args.seq_len} random token ids, batches of 1. Capped run: a memory cgroup of {args.cap_mib} MiB "
             "(anonymous memory and page cache together, no swap). Peak anonymous memory: RssAnon sampled every "
             "20 ms; the weights' file pages are not in it.", "",
             "| run | result | weights memory-mapped after loading | blocks on disk (device map) | peak anonymous memory "
             "MiB | cgroup peak MiB | load s | compress s | save s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        peak = mib(cgroup_peak) if name.startswith("capped") else "-"
        if "failed" in r:
            lines.append(f"| {name} | {r['failed']} | | | | {peak} | | | |")
            print(r["stderr"], file=sys.stderr)
        else:
            lines.append(f"| {name} | ok | {r['mapped']:.1%} | {r['on_disk']} | {mib(r['peak_anon'])} | {peak} | {r['load_s']:.1f} "
                         f"| {r['compress_s']:.1f} | {r['save_s']:.1f} |")
    lines += ["", f"The {len(runs)} runs wrote bit-identical weights: {'yes' if same else 'NO'}."]
    publish(lines, args.append)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
