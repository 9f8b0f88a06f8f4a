"""What a run reports: the before/after table, the figures, the model card (its record, ``flatten_run.json``, is
``flatten.models.record``)."""

from __future__ import annotations

import platform
import re
import shlex
from pathlib import Path

import torch

from flatten.evaluation.latency import Ratio
from flatten.files import tensors_sha256, write_atomically
from flatten.models.dispatch import load_offloaded
from flatten.models.record import RUN_RECORD, RunRecord

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


def results_table(record: RunRecord) -> str:
    """A Markdown table, before / after / after-to-before, of what ``record.results`` holds."""
    results = record.results
    rows = [("layers", *results.layers, ""), ("parameters", *results.parameters, "")]
    rows = [(name, f"{b:,}", f"{a:,}", _ratio(b, a)) for name, b, a, _ in rows]
    for b, a in results.perplexity:
        rows.append((f"perplexity, {_short(b['text'])}", f"{b['value']:.2f}", f"{a['value']:.2f}",
                     _ratio(b["value"], a["value"])))
    spread = {r["batch"]: r for r in results.latency_ratios}
    for b, a in results.latency:
        label, paired = f"batch {b['batch']}, {b['prompt']}-token prompt", spread.get(b["batch"])
        for kind, name, digits in (("prefill", f"prefill ms ({label})", 1),
                                   ("decode", f"decode ms/token (batch {b['batch']})", 2)):
            before, after = b[f"{kind}_ms"], a[f"{kind}_ms"]
            ratio = str(Ratio(**paired[kind])) if paired else _ratio(before, after)
            rows.append((name, f"{before:.{digits}f}", f"{after:.{digits}f}", ratio))
    header = ("", "before", "after", "after / before")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                          for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def protocol_lines(record: RunRecord) -> list[str]:
    """How each number in the table was measured, one sentence each."""
    results, calibration = record.results, record.calibration
    lines = [f"Compression: {results.compression_seconds:.1f} s, peak memory {results.peak_memory_gib:.2f} GiB "
             f"(process resident set size, sampled every 5 ms)."]
    lines.append(f"Calibration: {calibration['samples']} x {calibration['seq_len']} tokens of {calibration['source']} "
                 f"(seed {calibration['seed']}, token sha256 {calibration['sha256'][:16]}).")
    for p, _ in results.perplexity:
        lines.append(f"Perplexity, {_short(p['text'])}: the first {p['windows']} non-overlapping windows of "
                     f"{p['seq_len']} tokens of {p['text']}, each window scored on its own.")
    if results.latency:
        lat = results.latency[0][0]
        lines.append(f"Latency: median of {lat['repeats']} runs after a warm-up, random prompts, greedy decoding of "
                     f"{lat['new_tokens']} tokens with the KV cache; the original and the result timed in turn "
                     "(interleaved). After / before: the median of the paired ratios and an interval of it "
                     "(order statistics, coverage about 95 % with 9 or more pairs); \"not resolved\" where the "
                     "interval holds 1.0, that is, where this machine's noise could explain the difference.")
    lines.append(f"Machine: {record.machine}.")
    return lines


def similarity_heatmap(similarity, spans: list[tuple[int, int]], path: str | Path, title: str = "") -> Path | None:
    """Draw the block-input similarity matrix with the spans made one block outlined, as a PNG at ``path``.
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
    ax.set_title(title or "block-input similarity; spans made one block in red", fontsize=9)
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


STEP_WORDS = {
    "merged": "Merged: two blocks (or a run of them, `12+13-18`) flattened into one block as wide as all of them "
              "(their attention heads and MLP channels side by side), then pruned back to the original width, "
              "keeping heads or channels of more than one block.",
    "absorbed": "Absorbed: a block removed, and the block kept in its place refitted (its `down_proj` by least "
                "squares) to compute what the two blocks computed.",
    "dropped": "Dropped: a block removed, the blocks around it unchanged.",
}


def step_counts(what: str) -> str:
    """``"2 merged, 4 absorbed"``: the steps a plan's description names, by kind."""
    return ", ".join(f"{n} {kind}" for kind in STEP_WORDS if (n := len(re.findall(rf"\b{kind}\b", what))))


def model_card(record: RunRecord) -> str:
    """A README.md for the compressed checkpoint: what it is, how it was made, how it was measured."""
    method, calibration = record.method, record.calibration
    layers_before, layers_after = record.results.layers
    lines = [
        "---",
        "library_name: transformers",
        "tags: [flatten, depth-compression, pruning]",
        "---",
        "",
        f"# {record.name}",
        "",
        f"`{record.base_model}` "
        + (f"with its depth reduced from {layers_before} to {layers_after} decoder blocks"
           if layers_after < layers_before else f"with all {layers_after} decoder blocks kept")
        + f" by {record.strategy}, made with the `flatten` library {record.versions.get('flatten-gpt')}. "
        "It is a stock checkpoint of its architecture: load it with `AutoModelForCausalLM.from_pretrained(folder)`.",
        "",
        "## How it was made",
        "",
        f"- What was done (block indices of the original model): {record.what}.",
        *([f"- Scorer `{method['scorer']}` (`{method.get('scorer_config')}`), policy `{method['policy']}`, "
           f"similarity `{method['similarity']}`, selection `{method.get('select', 'scorer')}`."]
          if "policy" in method else []),
        *[f"- {STEP_WORDS[kind]}" for kind in STEP_WORDS if re.search(rf"\b{kind}\b", record.what)],
        f"- Calibration: {calibration['samples']} x {calibration['seq_len']} tokens of "
        f"{calibration['source']}.",
        f"- Every decision is in `{record.decisions}`; the full record of the run is `{RUN_RECORD}`.",
        f"- Command: `{record.command}`",
        "",
        "## Measured",
        "",
        results_table(record),
        "",
        *protocol_lines(record),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in record.versions.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def command_line(argv: list[str]) -> str:
    """The ``flatten`` command with these arguments, as a shell would take it."""
    return shlex.join(["flatten", *argv])


def weights_sha256(model: torch.nn.Module) -> str:
    """A digest of every tensor of ``model`` (names, dtypes, shapes and bytes): the same exactly when the
    weights are bit-identical."""
    return tensors_sha256((name, load_offloaded(model, name) if t.is_meta else t)  # offloaded: one at a time
                          for name, t in sorted(model.state_dict().items()))

def write_report(folder: str | Path, record: RunRecord, decisions) -> list[str]:
    """Into ``folder``, beside a saved checkpoint: the decisions (``flatten.strategies.compressor.Decisions``: a ``Plan``
    or a ``Removal``, as ``record.decisions``), the figure of what they were based on, the model card and the run record. Returns
    the names of the figures drawn (none without matplotlib)."""
    folder, figures = Path(folder), []
    decisions.save(folder / record.decisions)
    similarity, spans = getattr(decisions, "similarity", None), getattr(decisions, "spans", None)
    if similarity is not None and similarity_heatmap(similarity, spans or [], folder / "similarity.png",
                                                     f"{record.base_model}: block-input similarity; red: spans "
                                                     f"made one block ({step_counts(record.what)})"):
        figures.append("similarity.png")
    cut = decisions.method.get("cut_distances")
    if cut is not None and spans and cut_plot(cut, (spans[0][0] + 1, spans[0][1]), folder / "cut.png",
                                              f"{record.base_model}: {record.what}"):
        figures.append("cut.png")
    (folder / "README.md").write_text(model_card(record))
    record.save(folder)
    return figures
