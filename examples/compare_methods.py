"""Compare scorers on the same model, calibration and evaluation: here the paper's recipe, the library's
default and a magnitude baseline, removing 2 of SmolLM2-135M's 30 blocks.

`benchmarks/compress.py` does the same at full size, for every registered scorer and policy.
"""

import copy

from flatten import Flattener, load_model, perplexity
from flatten.data import calibration_tokens, evaluation_text, tokenize

original, tokenizer = load_model("smollm2-135m")
calibration = calibration_tokens(tokenizer, samples=8, seq_len=128)  # Wikipedia lead sections
text, about = evaluation_text()  # WikiText-2 test beside the project, else held-out Wikipedia leads
ids = tokenize(tokenizer, text, max_tokens=8 * 128)

print(f"perplexity on {about}, 8 x 128 tokens")
print(f"{'dense':>16}: {perplexity(original, ids, seq_len=128).value:7.2f}  (30 blocks)")
for scorer in ("flattengpt", "reconstruction", "magnitude"):
    model, plan = Flattener(copy.deepcopy(original), calibration, scorer=scorer, progress=False).compress(remove=2)
    print(f"{scorer:>16}: {perplexity(model, ids, seq_len=128).value:7.2f}  (spans {plan.spans}, "
          f"{plan.method['seconds']:.0f} s)")
