"""merge_pair: one merge as the Flattener takes it, callable on its own."""

import torch

from flatten import Flattener, get_scorer, merge_pair
from flatten.calibration import run_block
from flatten.criteria import FixedSpans
from tiny import TinySpec, pair_inputs, tiny_model


def test_merge_pair_builds_the_block_the_flattener_puts_in():
    spec = TinySpec("qwen2", 2, 2, 2, 4, 16, num_layers=5, bias=True, dtype=torch.float64)
    calibration = torch.randint(0, 61, (4, 10), generator=torch.Generator().manual_seed(3))
    for select in ("scorer", "objective"):
        compressed, plan = Flattener(tiny_model(spec), calibration, policy=FixedSpans([(2, 3)]), fit_to="pair",
                                     batch_size=2, progress=False, select=select).compress()
        model = tiny_model(spec)
        pair, hidden, calls = pair_inputs(model, 2, calibration)
        block, merge = merge_pair(pair, get_scorer("reconstruction"), hidden, calls, select=select)
        assert (merge.keep_groups, merge.keep_channels) == (plan.merges[0].keep_groups, plan.merges[0].keep_channels)
        want = compressed.model.layers[2].state_dict()
        for name, tensor in block.state_dict().items():
            torch.testing.assert_close(tensor, want[name], rtol=0, atol=0)
        assert model.config.num_hidden_layers == 5  # the model is not changed


def test_keeping_the_first_block_of_a_pair_with_a_silent_second_gives_the_first_back():
    spec = TinySpec("llama", 2, 2, 2, 4, 16, num_layers=4, dtype=torch.float64)
    model = tiny_model(spec)
    with torch.no_grad():
        for writer in (model.model.layers[2].self_attn.o_proj, model.model.layers[2].mlp.down_proj):
            writer.weight.zero_()
    calibration = torch.randint(0, 61, (4, 10), generator=torch.Generator().manual_seed(4))
    pair, hidden, calls = pair_inputs(model, 1, calibration)
    block, merge = merge_pair(pair, get_scorer("reconstruction"), hidden, calls, keep="first")
    assert merge.keep_groups == [0, 1] and merge.keep_channels == list(range(16))
    torch.testing.assert_close(run_block(block, hidden, calls), run_block(pair.first, hidden, calls), rtol=1e-6, atol=1e-6)
