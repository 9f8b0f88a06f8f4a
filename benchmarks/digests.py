"""Digests of the weights that several recipes give on the real SmolLM2-135M: run it before and after a
change that should not alter results, and compare the two JSON files (equal digests: bit-identical weights).

    python digests.py before.json   # on the old commit
    python digests.py after.json    # on the new one
    cmp before.json after.json
"""

import json
import sys

from flatten import build_strategy, calibration_tokens, load_model
from flatten.files import tensors_sha256
from flatten.run.pipeline import compress_timed

RECIPES = {  # as ``flatten compress --method`` and compare.py take them (flatten.strategies.options)
    "cut (the default)": "cut-absorb",
    "greedy": "cut-absorb:policy=greedy:policy.keep_last=1",
    "greedy, paper scorer": "cut-absorb:policy=greedy:policy.keep_last=1:scorer=flattengpt",
    "greedy, one-block fallback": "cut-absorb:policy=greedy:policy.keep_last=1:one_block_fallback=true",
    "greedy, fit to pair, input-rms": "cut-absorb:policy=greedy:policy.keep_last=1:fit_to=pair:token_weighting=input-rms",
    "greedy, MLP pruned only": "cut-absorb:policy=greedy:policy.keep_last=1:prune=mlp",
    "greedy, one-block fallback by the loss": "cut-absorb:policy=greedy:policy.keep_last=1:one_block_fallback=loss",
    "the paper's recipe": "flattengpt",
    "cut-merge": "cut-merge",
    "cut-flatten": "cut-flatten",
    "loss search": "cut-absorb:policy=loss-search:policy.merges=2:policy.absorbs=2:policy.drops=2:select=objective",
}


def main(path: str) -> None:
    found = {}
    for name, method in RECIPES.items():
        model, tokenizer = load_model("smollm2-135m")
        calibration = calibration_tokens(tokenizer, samples=8, seq_len=128)
        done = compress_timed(build_strategy(method, model, calibration, progress=False), 2)
        found[name] = {"weights": tensors_sha256(sorted(done.model.state_dict().items())), "spans": done.decisions.spans}
        print(f"{name}: {found[name]['weights'][:16]} spans {done.decisions.spans} ({done.seconds:.0f} s)")
    with open(path, "w") as f:
        json.dump(found, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
