"""Try your own plan: subclass PairPolicy, register it, use it by name.

A policy sees the compression through a SearchState (the spans each block holds, how many blocks are left to
remove) and asks it for the signals it wants: block-input similarity, block influence, the angular distance
of contiguous runs, the calibration loss after a trial merge, absorb or drop. Here, at every step, the block
of least influence (ShortGPT's signal, measured again on the model as it is) is absorbed into its neighbour:
its neighbour's down_proj is refitted to compute what the two blocks computed.
"""

import torch

from flatten import Flattener, load_model
from flatten.criteria import PairPolicy, Step, register_policy


@register_policy("absorb-least-influence")
class AbsorbLeastInfluence(PairPolicy):
    def next_steps(self, state):
        influence = state.influence()[:-1]  # the last block stays
        return [Step("absorb", int(influence.argmin()))]


model, tokenizer = load_model("smollm2-135m")
calibration = torch.randint(0, tokenizer.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
model, plan = Flattener(model, calibration, policy="absorb-least-influence").compress(remove=2)
print(f"{plan.describe()}; {model.config.num_hidden_layers} blocks left")
