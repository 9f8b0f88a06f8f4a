"""Add your own depth-reduction strategy, with options, in one file: it works from Python, the command line
and benchmarks/compare.py without a change anywhere else.

The strategy here drops the blocks whose update is smallest relative to their input, ``||f(x) - x|| / ||x||``
(ShortGPT's idea measured by norm instead of angle). Its options are constructor parameters declared with
``Annotated[type, "help"]``: ``flatten compress --help`` lists them, and ``NAME:key=value`` sets them.

    python examples/custom_strategy.py          # all three routes on SmolLM2-135M
    flatten compress smollm2-135m --plugin examples/custom_strategy.py --method relative-update:tokens=last --remove 4
    python benchmarks/compare.py --plugin examples/custom_strategy.py --remove 4 --methods relative-update,shortgpt
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch

from flatten import calibration_tokens, load_model
from flatten.merge import remove_blocks
from flatten.strategies.baselines import Baseline
from flatten.strategies.compressor import register_strategy
from flatten.strategies.options import build_strategy


@register_strategy("relative-update")
class RelativeUpdate(Baseline):
    """Delete the ``k`` blocks of smallest mean relative update ``||f(x) - x|| / ||x||`` over the calibration
    tokens (or the sequences' last tokens), measured once through the unchanged model."""

    name = "relative-update"
    title = "relative-update drop (example strategy)"

    def __init__(self, model, calibration,
                 tokens: Annotated[str, "all or last: the tokens the update is averaged over"] = "all",
                 keep_first: Annotated[int, "blocks at the bottom that are never removed"] = 1,
                 batch_size: int = 4, device=None, progress: bool = True):
        super().__init__(model, calibration, batch_size=batch_size, device=device, progress=progress)
        if tokens not in ("all", "last"):
            raise ValueError(f"tokens must be 'all' or 'last', got {tokens!r}")
        self.tokens, self.keep_first = tokens, keep_first

    def options(self) -> dict:
        return {"tokens": self.tokens, "keep_first": self.keep_first}

    @torch.no_grad()
    def compress(self, remove=None, ratio=None):
        k, start = self.blocks_to_remove(remove, ratio), time.perf_counter()
        inputs = self.capture_inputs()
        hidden, updates = inputs.hidden, []
        for i, layer in enumerate(self.arch.layers_of(self.model)):
            out = self.run_layer(layer, hidden, inputs.calls[i], name=f"block {i}")
            rows = [(y - x)[:, -1:] if self.tokens == "last" else y - x for x, y in zip(hidden, out)]
            scale = [x[:, -1:] if self.tokens == "last" else x for x in hidden]
            updates.append(float(torch.cat([(r.norm(dim=-1) / s.norm(dim=-1)).flatten() for r, s in zip(rows, scale)])
                                 .mean()))
            hidden = out
        order = sorted(range(self.keep_first, len(updates)), key=updates.__getitem__)
        drop = sorted(order[:k])
        remove_blocks(self.model, drop, self.arch)
        return self.model, self.record_removal(start, removed=drop, scores={"relative_update": updates})


def main() -> None:
    here = Path(__file__).resolve()
    model, tokenizer = load_model("smollm2-135m")
    calibration = calibration_tokens(tokenizer, samples=4, seq_len=128)
    model, removal = build_strategy("relative-update:tokens=last", model, calibration, progress=False).compress(remove=4)
    print(f"Python: {removal.describe()}; {model.config.num_hidden_layers} blocks left")

    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "flatten.run.cli", "compress", "smollm2-135m", "--plugin", str(here),
                   "--method", "relative-update:keep_first=2", "--remove", "4", "--samples", "4", "--seq-len", "128",
                   "--no-eval", "--no-latency", "--quiet", "--out", str(Path(folder) / "out")]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        print("command line: " + next(line for line in done.stdout.splitlines() if "blocks by" in line))

    compare = here.parents[1] / "benchmarks" / "compare.py"
    if compare.is_file():  # a clone of the repository
        with tempfile.TemporaryDirectory() as folder:  # its results, not benchmarks/results/
            command = [sys.executable, str(compare), "--plugin", str(here), "--remove", "4", "--samples", "4",
                       "--seq-len", "128", "--windows", "2", "--eval", "alice", "--methods", "relative-update,shortgpt",
                       "--json", str(Path(folder) / "results.json")]
            done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=compare.parent)
        print("compare.py:\n" + "\n".join(line for line in done.stdout.splitlines() if line.startswith("|")))


if __name__ == "__main__":
    main()
