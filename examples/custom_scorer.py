"""Try your own importance metric: subclass ChannelScorer, register it, use it by name.

Here MLP channels are kept by the product of their mean activation magnitude and the norm of their
down-projection column ("what this channel writes into the residual stream"); KV groups keep the default
(summed head contribution). No compensation.
"""

import torch

from flatten import ChannelScorer, Flattener, load_model, register_scorer


@register_scorer("written-energy")
class WrittenEnergy(ChannelScorer):
    def score_channels(self, stats):
        rms = (stats.gram.diagonal() / stats.tokens).sqrt()  # RMS of each channel's activation psi_i
        return rms * stats.weights["down"].double().norm(dim=0)  # times || W_down[:, i] ||


model, tokenizer = load_model("smollm2-135m")
calibration = torch.randint(0, tokenizer.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
model, plan = Flattener(model, calibration, scorer="written-energy", policy="greedy").compress(remove=1)  # a merge
merge = plan.merges[0]
print(f"flattened blocks {merge.span} (similarity {merge.similarity:.3f}); kept KV groups {merge.keep_groups}, "
      f"{sum(c < 1536 for c in merge.keep_channels)} channels of the first block and "
      f"{sum(c >= 1536 for c in merge.keep_channels)} of the second")
