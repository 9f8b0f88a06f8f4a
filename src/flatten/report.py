"""What a compression run reports: the before/after table, the similarity heatmap, the model card."""

from __future__ import annotations

import platform
import shlex
from pathlib import Path

import torch

from flatten.files import tensors_sha256, write_atomically


def versions() -> dict:
    """Versions of the library and of what its numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("flatten-gpt", "torch", "transformers", "accelerate", "gguf", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _short(text: str) -> str:
    """A text's name and domain, from its description (``name (domain: source)`` or ``file (...)``)."""
    name, _, rest = text.partition(" (")
    domain = rest.split(":")[0] if ":" in rest.split(")")[0] else ""
    return f"{name} ({domain})" if domain else name


def _ratio(before, after) -> str:
    return f"{after / before:.3f}" if before else ""


def results_table(record: dict) -> str:
    """A Markdown table, before / after / after-to-before, of what ``record["results"]`` holds."""
    results = record["results"]
    rows = [("layers", *results["layers"], ""), ("parameters", *results["parameters"], "")]
    rows = [(name, f"{b:,}", f"{a:,}", _ratio(b, a)) for name, b, a, _ in rows]
    for b, a in results.get("perplexity") or []:
        rows.append((f"perplexity, {_short(b['text'])}", f"{b['value']:.2f}", f"{a['value']:.2f}",
                     _ratio(b["value"], a["value"])))
    for b, a in results.get("latency") or []:
        label = f"batch {b['batch']}, {b['prompt']}-token prompt"
        rows.append((f"prefill ms ({label})", f"{b['prefill_ms']:.1f}", f"{a['prefill_ms']:.1f}",
                     _ratio(b["prefill_ms"], a["prefill_ms"])))
        rows.append((f"decode ms/token (batch {b['batch']})", f"{b['decode_ms']:.2f}", f"{a['decode_ms']:.2f}",
                     _ratio(b["decode_ms"], a["decode_ms"])))
    header = ("", "before", "after", "after / before")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                          for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def protocol_lines(record: dict) -> list[str]:
    """How each number in the table was measured, one sentence each."""
    results, calibration = record["results"], record["calibration"]
    lines = [f"Compression: {results['compression_seconds']:.1f} s, peak memory {results['peak_memory_gib']:.2f} GiB "
             f"(process resident set size, sampled every 5 ms)."]
    lines.append(f"Calibration: {calibration['samples']} x {calibration['seq_len']} tokens of {calibration['source']} "
                 f"(seed {calibration['seed']}, token sha256 {calibration['sha256'][:16]}).")
    for p, _ in results.get("perplexity") or []:
        lines.append(f"Perplexity, {_short(p['text'])}: the first {p['windows']} non-overlapping windows of "
                     f"{p['seq_len']} tokens of {p['text']}, each window scored on its own.")
    if results.get("latency"):
        lat = results["latency"][0][0]
        lines.append(f"Latency: median of {lat['repeats']} runs after a warm-up, random prompts, greedy decoding of "
                     f"{lat['new_tokens']} tokens with the KV cache; before and after measured in the same process.")
    lines.append(f"Machine: {record['machine']}.")
    return lines


def similarity_heatmap(similarity, spans: list[tuple[int, int]], path: str | Path, title: str = "") -> Path | None:
    """Draw the block-input similarity matrix with the flattened spans outlined, as a PNG at ``path``.
    Returns None (and draws nothing) when matplotlib is not installed: ``pip install 'flatten-gpt[plot]'``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ModuleNotFoundError:
        return None
    matrix = torch.as_tensor(similarity, dtype=torch.float64).numpy()
    count = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=120)
    image = ax.imshow(matrix, cmap="viridis", origin="upper")
    fig.colorbar(image, ax=ax, label="similarity of block inputs (mean over tokens)")
    for a, c in spans:
        ax.add_patch(Rectangle((a - 0.5, a - 0.5), c - a + 1, c - a + 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xlabel("block")
    ax.set_ylabel("block")
    step = max(1, count // 15)
    ax.set_xticks(range(0, count, step))
    ax.set_yticks(range(0, count, step))
    ax.set_title(title or "block-input similarity; flattened spans in red", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def cut_plot(distances, run: tuple[int, int], path: str | Path, title: str = "") -> Path | None:
    """Draw the angular distance of each contiguous run (by its first block) with the run removed marked, as a
    PNG at ``path``; None (nothing drawn) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(range(len(distances)), distances, marker="o", markersize=3)
    ax.axvline(run[0], color="red", linewidth=1)
    ax.set_xlabel(f"first block of a run of {run[1] - run[0] + 1}")
    ax.set_ylabel("angular distance, run input to output")
    ax.set_title(title or f"blocks {run[0]}-{run[1]} removed (red)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def model_card(record: dict) -> str:
    """A README.md for the compressed checkpoint: what it is, how it was made, how it was measured."""
    method, results = record["method"], record["results"]
    layers_before, layers_after = results["layers"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [flatten, flattengpt, depth-compression, pruning]",
        "---",
        "",
        f"# {record['name']}",
        "",
        f"`{record['base_model']}` "
        + (f"with its depth reduced from {layers_before} to {layers_after} decoder blocks"
           if layers_after < layers_before else f"with all {layers_after} decoder blocks kept")
        + f" by {record['strategy']}, made with the `flatten` library {record['versions'].get('flatten-gpt')}. "
        "It is a stock checkpoint of its architecture: load it with `AutoModelForCausalLM.from_pretrained(folder)`.",
        "",
        "## How it was made",
        "",
        f"- What was done (block indices of the original model): {record['what']}.",
        *([f"- Scorer `{method['scorer']}` (`{method.get('scorer_config')}`), pair policy `{method['policy']}`, "
           f"similarity `{method['similarity']}`. Each flattened span became one block: the blocks' attention heads "
           "and MLP channels side by side, then pruned back to the original width."] if "policy" in method else []),
        f"- Calibration: {record['calibration']['samples']} x {record['calibration']['seq_len']} tokens of "
        f"{record['calibration']['source']}.",
        f"- Every decision is in `{record['decisions']}`; the full record of the run is `flatten_run.json`.",
        f"- Command: `{record['command']}`",
        "",
        "## Measured",
        "",
        results_table(record),
        "",
        *protocol_lines(record),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def command_line(argv: list[str]) -> str:
    """The ``flatten`` command with these arguments, as a shell would take it."""
    return shlex.join(["flatten", *argv])


def weights_sha256(model: torch.nn.Module) -> str:
    """A digest of every tensor of ``model`` (names, dtypes, shapes and bytes): the same exactly when the
    weights are bit-identical."""
    return tensors_sha256(sorted(model.state_dict().items()))