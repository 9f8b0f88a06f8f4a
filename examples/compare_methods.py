"""Compare methods on the same model, calibration and evaluation: FlattenGPT with the library's default
scorer and with the paper's, against the ShortGPT baseline, each removing 2 of SmolLM2-135M's 30 blocks.

`benchmarks/compare.py` does the same at full size, for every strategy and option, with zero-shot accuracy.
"""

import copy

from flatten import get_strategy, load_model, perplexity
from flatten.data import calibration_tokens, evaluation_text, tokenize

original, tokenizer = load_model("smollm2-135m")
calibration = calibration_tokens(tokenizer, samples=9, seq_len=128)  # the default mix: 3 windows of each domain
text, about = evaluation_text()  # WikiText-2 test beside the project, else held-out Wikipedia leads
ids = tokenize(tokenizer, text, max_tokens=8 * 128)

print(f"perplexity on {about}, 8 x 128 tokens")
print(f"{'dense':>28}: {perplexity(original, ids, seq_len=128).value:7.2f}")
for label, strategy, options in [("flattengpt (default scorer)", "flattengpt", {}),
                                 ("flattengpt (paper's scorer)", "flattengpt", {"scorer": "flattengpt"}),
                                 ("shortgpt", "shortgpt", {})]:
    compressor = get_strategy(strategy)(copy.deepcopy(original), calibration, progress=False, **options)
    model, record = compressor.compress(remove=2)
    print(f"{label:>28}: {perplexity(model, ids, seq_len=128).value:7.2f}  ({record.describe()}, "
          f"{record.method['seconds']:.0f} s)")
