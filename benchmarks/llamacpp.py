"""The default compression of SmolLM2-135M, exported to GGUF and run in llama.cpp itself (llama-cpp-python):
greedy continuation, perplexity computed from llama.cpp's own logits, decode speed; at f16 and after llama.cpp's
own quantization (Q8_0, Q4_K_M), for the dense model and the compressed one, against transformers' numbers.

    pip install llama-cpp-python          # builds llama.cpp from source (about 11 minutes on 2 CPUs)
    python benchmarks/llamacpp.py --remove 6 --append benchmarks/RESULTS.md

The dense model's weights come de-quantized from a Q4_1 GGUF file (the embedded SmolLM2): they lie on that grid,
so its own re-quantization is no clean reference for what quantizing costs a model; the compressed model's
refitted weights do not lie on it.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from flatten import Flattener, calibration_tokens, load_model, perplexity
from flatten.data import evaluation_text, tokenize
from flatten.evaluation.measure import machine
from flatten.models.export import export_gguf
from flatten.models.loading import embedded_model_path
from harness import publish

PROMPT = "The capital of France is"
QUANTS = {"q8_0": 7, "q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_K_M


def quantize(source: Path, target: Path, ftype: int) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source}")
    return target


def llama_cpp_run(path: Path, windows: torch.Tensor, new_tokens: int) -> dict:
    """Perplexity over ``windows`` (each scored on its own) from llama.cpp's logits, the greedy continuation of
    PROMPT, and decode tokens per second, single-threaded."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=windows.shape[1], logits_all=True, n_threads=1, n_batch=windows.shape[1],
                verbose=False)
    nll, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    llm.reset()
    start = time.perf_counter()
    out = llm.create_completion(PROMPT, max_tokens=new_tokens, temperature=0.0)
    seconds = time.perf_counter() - start
    tokens = out["usage"]["completion_tokens"]
    return {"ppl": math.exp(nll / count), "text": out["choices"][0]["text"], "tokens_per_s": tokens / seconds,
            "layers": llm.metadata.get("llama.block_count")}


def transformers_greedy(model, tokenizer, new_tokens: int) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remove", type=int, default=6)
    parser.add_argument("--windows", type=int, default=8, help="512-token windows of each text")
    parser.add_argument("--texts", default="wikitext2,alice")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--append", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    dense, tokenizer = load_model("smollm2-135m")
    compressed, plan = Flattener(load_model("smollm2-135m")[0], calibration_tokens(tokenizer), progress=False
                                 ).compress(remove=args.remove)
    texts = {}
    for name in args.texts.split(","):
        text, about = evaluation_text(name)
        texts[name] = (tokenize(tokenizer, text, max_tokens=args.windows * 512)[: args.windows * 512].view(-1, 512), about)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, model in (("dense", dense), (f"default, {args.remove} removed", compressed)):
            f16 = export_gguf(model, Path(folder) / f"{len(rows)}-f16.gguf", outtype="f16",
                              tokenizer_from=embedded_model_path())
            ppl = {n: perplexity(model, ids.reshape(-1), seq_len=512, max_windows=args.windows, text=about).value
                   for n, (ids, about) in texts.items()}
            rows.append((label, "transformers f32", model.config.num_hidden_layers, ppl,
                         transformers_greedy(model, tokenizer, args.new_tokens), None))
            files = {"f16": f16, **{q: quantize(f16, f16.with_name(f16.name.replace("f16", q)), t)
                                    for q, t in QUANTS.items()}}
            for kind, path in files.items():
                runs = {n: llama_cpp_run(path, ids, args.new_tokens) for n, (ids, _) in texts.items()}
                first = next(iter(runs.values()))
                rows.append((label, f"llama.cpp {kind}", first["layers"], {n: r["ppl"] for n, r in runs.items()},
                             first["text"], first["tokens_per_s"]))
                print(rows[-1], flush=True)
    lines = [f"### SmolLM2-135M in llama.cpp: dense and the default compression ({date.today()})", "",
             f"Command (from `benchmarks/`): `python {' '.join(sys.argv)}`", "", f"Machine: {machine()}", "",
             f"Plan: {plan.describe()}. GGUF written by `flatten.models.export.export_gguf` (f16), quantized by llama.cpp's "
             f"own `llama_model_quantize`; perplexity from llama.cpp's logits over the first {args.windows} windows "
             f"of 512 tokens of each text (each scored on its own), the same token ids transformers scores; greedy "
             f"continuation of {PROMPT!r} ({args.new_tokens} tokens) and decode speed with one thread.", "",
             "| model | runtime | layers |" + "".join(f" {n} ppl |" for n in texts) + " tokens/s | greedy continuation |",
             "|---|---|---|" + "---|" * len(texts) + "---|---|"]
    for label, runtime, layers, ppl, text, speed in rows:
        shown = repr(text.strip()).replace("|", "\\|")
        lines.append(f"| {label} | {runtime} | {layers} |" + "".join(f" {ppl[n]:.2f} |" for n in texts)
                     + f" {'' if speed is None else f'{speed:.1f}'} | {shown} |")
    publish(lines, args.append)


if __name__ == "__main__":
    main()
