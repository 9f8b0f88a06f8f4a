"""The depth-pruning baselines on tiny models: each removes what it says and leaves a stock checkpoint."""

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from flatten import save_checkpoint
from flatten.evaluation.perplexity import mean_nll, perplexity
from flatten.merge import remove_blocks, replace_span
from flatten.strategies.baselines import LaCo, Removal
from flatten.strategies.compressor import STRATEGIES, get_strategy
from tiny import TinySpec, tiny_model

SPEC = TinySpec("llama", hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=4, intermediate_size=24,
                num_layers=6, dtype=torch.float32)
CALIBRATION = torch.randint(0, 61, (4, 12), generator=torch.Generator().manual_seed(3))


def _identity_blocks(model, blocks):
    """Make ``blocks`` add nothing to the residual stream (zero output projections)."""
    with torch.no_grad():
        for i in blocks:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def _same_function(a, b):
    ids = CALIBRATION[:2]
    torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_every_strategy_is_registered():
    get_strategy("flattengpt")
    assert {"cut-absorb", "cut-merge", "flattengpt", "shortgpt", "sleb", "laco", "blockpruner", "prune-only", "angular",
            "replaceme"} <= set(STRATEGIES.names())
    with pytest.raises(ValueError, match="unknown strategy 'nope'; known: .*shortgpt"):
        get_strategy("nope")


def test_shortgpt_drops_the_blocks_that_change_their_input_least():
    model = _identity_blocks(tiny_model(SPEC), [1, 4])
    expected = remove_blocks(copy.deepcopy(model), [1, 4])
    model, record = get_strategy("shortgpt")(model, CALIBRATION, progress=False).compress(remove=2)
    assert record.removed == [1, 4]
    influence = record.scores["block_influence"]
    assert influence[1] == pytest.approx(0, abs=1e-6) and influence[4] == pytest.approx(0, abs=1e-6)
    assert min(influence[i] for i in (0, 2, 3, 5)) > 1e-3
    assert model.config.num_hidden_layers == len(model.model.layers) == 4
    _same_function(model, expected)


def test_sleb_removes_the_block_a_brute_force_search_would():
    model = tiny_model(SPEC)
    batches = list(CALIBRATION.split(4))
    losses = [mean_nll(remove_blocks(copy.deepcopy(model), [i]), batches) for i in range(6)]
    first = min(range(6), key=losses.__getitem__)
    original = copy.deepcopy(model)
    model, record = get_strategy("sleb")(model, CALIBRATION, progress=False).compress(remove=2)
    assert record.scores["order"][0] == first
    assert record.scores["candidate_losses"][0] == pytest.approx(losses, rel=1e-5)
    assert len(record.removed) == 2 and model.config.num_hidden_layers == 4
    _same_function(model, remove_blocks(original, record.removed))


def _linear_parameters(block) -> set[str]:
    return {f"{name}.{key}" for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)
            for key, _ in module.named_parameters(recurse=False)}


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_laco_rdsc_merge_is_the_base_plus_the_sum_of_the_differences(model_type):
    """The paper's Eq. 1 on the linear layers (weights and biases); the norms stay the base block's."""
    spec = TinySpec(model_type, 2, 2, 2, 4, 24, num_layers=6, bias=model_type == "qwen2", dtype=torch.float32)
    model = tiny_model(spec)
    blocks = [model.model.layers[i] for i in (2, 3, 4, 5)]
    states = [{name: t.double() for name, t in block.state_dict().items()} for block in blocks]
    linear = _linear_parameters(blocks[0])
    assert {"self_attn.q_proj.weight", "mlp.down_proj.weight"} <= linear
    assert ("self_attn.q_proj.bias" in linear) == (model_type == "qwen2")
    merged = LaCo.collapsed_block(blocks, "rdsc").state_dict()
    assert merged.keys() == states[0].keys()
    for name, tensor in merged.items():
        base = states[0][name]
        want = base + sum(state[name] - base for state in states[1:]) if name in linear else base
        torch.testing.assert_close(tensor.double(), want, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_laco_official_merge_is_what_the_official_in_place_update_leaves():
    """The official code adds ``theta_k - theta`` to the base in place for each following block k, so the
    merged linear layers are the last block's; with two blocks Eq. 1 gives the same."""
    model = tiny_model(SPEC)
    blocks = [model.model.layers[i] for i in (2, 3, 4, 5)]
    linear = _linear_parameters(blocks[0])
    merged = LaCo.collapsed_block(blocks, "official").state_dict()
    for name, tensor in merged.items():
        want = blocks[0].state_dict()[name].clone()
        if name in linear:
            for block in blocks[1:]:
                want += block.state_dict()[name] - want
        torch.testing.assert_close(tensor, want, msg=lambda m: f"{name}: {m}")
    pair = [model.model.layers[i] for i in (3, 4)]
    official = LaCo.collapsed_block(pair, "official").state_dict()
    rdsc = LaCo.collapsed_block(pair, "rdsc").state_dict()
    for name, tensor in official.items():
        torch.testing.assert_close(tensor, rdsc[name])
    with pytest.raises(ValueError, match="merge must be one of official, rdsc"):
        LaCo.collapsed_block(pair, "mean")


@pytest.mark.parametrize("merge", ["official", "rdsc"])
@pytest.mark.parametrize("interval, tried", [(1, [(3, 4), (2, 4), (1, 2), (0, 1)]), (2, [(3, 4), (1, 2), (0, 1)])])
def test_laco_walks_down_from_h_minus_c_and_keeps_the_collapses_that_leave_the_output_unchanged(merge, interval, tried):
    """Blocks 0, 1, 3 and 4 add nothing to the residual stream: a collapse of two of them leaves the last hidden
    states as they were (cosine 1), any other changes them. The walk starts at H - C = 3 (the top block is not
    merged first), moves down by I after a kept collapse (the next one may take in the block just merged) and by
    1 after a rejected one."""
    model = _identity_blocks(tiny_model(SPEC), [0, 1, 3, 4])
    original = copy.deepcopy(model)
    model, record = get_strategy("laco")(model, CALIBRATION, collapse=2, interval=interval, threshold=1 - 1e-6,
                                         merge=merge, progress=False).compress(remove=2)
    steps = record.scores["tried"]
    assert [tuple(step["span"]) for step in steps] == tried
    assert [step["kept"] for step in steps] == [span in ((3, 4), (0, 1)) for span in tried]
    assert all(step["kept"] == (step["similarity"] > step["threshold"]) for step in steps)
    assert record.scores["thresholds"] == [1 - 1e-6]  # one walk, the threshold as given
    assert record.collapsed == [(0, 1), (3, 4)] and record.removed == [1, 4]
    assert model.config.num_hidden_layers == len(model.model.layers) == 4
    _same_function(model, remove_blocks(original, [1, 4]))


def test_laco_scores_a_collapse_by_the_cosine_of_the_flattened_last_hidden_states():
    model = tiny_model(SPEC)
    expected = copy.deepcopy(model)
    model, record = get_strategy("laco")(copy.deepcopy(model), CALIBRATION, collapse=3, threshold=-2.0,
                                         progress=False).compress(remove=2)
    first = record.scores["tried"][0]
    assert first["span"] == [2, 4] and first["kept"] and record.collapsed == [(2, 4)]
    merged = LaCo.collapsed_block([expected.model.layers[i] for i in (2, 3, 4)], "official")
    original = copy.deepcopy(expected)
    replace_span(expected, 2, 5, merged)
    with torch.no_grad():
        a, b = (m.model(input_ids=CALIBRATION).last_hidden_state.double().flatten(1) for m in (original, expected))
    assert first["similarity"] == pytest.approx(float(F.cosine_similarity(a, b, dim=-1).mean()), abs=1e-6)
    assert first["similarity"] < 0.99  # a real change, not the identity
    _same_function(model, expected)


def test_laco_lowers_its_threshold_in_steps_until_it_removes_k():
    """T = 1.5: no collapse passes; the next walk's T is the highest on the grid 1.5 - j * step below the best
    rejected collapse, so that collapse now passes."""
    model, record = get_strategy("laco")(tiny_model(SPEC), CALIBRATION, collapse=3, threshold=1.5, step=0.5,
                                         progress=False).compress(remove=2)
    assert model.config.num_hidden_layers == len(model.model.layers) == 4
    assert sum(c - a for a, c in record.collapsed) == 2 and len(record.removed) == 2
    steps, thresholds = record.scores["tried"], record.scores["thresholds"]
    first_walk = [step for step in steps if step["threshold"] == 1.5]
    assert [step["span"] for step in first_walk] == [[2, 4], [1, 3], [0, 2]] and not any(s["kept"] for s in first_walk)
    best = max(step["similarity"] for step in first_walk)
    assert thresholds[0] == 1.5 and thresholds[1] < best <= thresholds[1] + 0.5
    assert (thresholds[1] - 1.5) / 0.5 == pytest.approx(round((thresholds[1] - 1.5) / 0.5))
    again = steps[len(first_walk)]  # the model is as it was: the same collapse, the same similarity
    assert again["span"] == [2, 4] and again["similarity"] == pytest.approx(first_walk[0]["similarity"])
    assert all(step["kept"] == (step["similarity"] > step["threshold"]) for step in steps) and steps[-1]["kept"]


def test_laco_checks_its_layer_range_and_options():
    with pytest.raises(ValueError, match="only into blocks 3 and above"):
        get_strategy("laco")(tiny_model(SPEC), CALIBRATION, lowest=3, collapse=2).compress(remove=3)
    with pytest.raises(ValueError, match="too shallow"):
        get_strategy("laco")(tiny_model(SPEC), CALIBRATION, collapse=6)
    with pytest.raises(ValueError, match="merge must be one of"):
        get_strategy("laco")(tiny_model(SPEC), CALIBRATION, merge="sum")
    model, record = get_strategy("laco")(tiny_model(SPEC), CALIBRATION, collapse=2, highest=3, threshold=-2.0,
                                         progress=False).compress(remove=1)
    assert record.scores["tried"][0]["span"] == [1, 2] and record.collapsed == [(1, 2)]


def _progression(rows: int, length: int, seed: int) -> torch.Tensor:
    """Arithmetic progressions mod 61 (step 7) from random starts: a task a tiny model learns in seconds."""
    start = torch.randint(0, 61, (rows, 1), generator=torch.Generator().manual_seed(seed))
    return (start + 7 * torch.arange(length)) % 61


@functools.cache
def _trained_tiny_model():
    torch.manual_seed(0)
    model = tiny_model(TinySpec("llama", 2, 2, 2, 4, 24, num_layers=8, dtype=torch.float32))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(200):
        ids = _progression(16, 12, step)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


def test_laco_keeps_the_perplexity_of_a_trained_tiny_model_bounded():
    """A trained model (perplexity about 5 on its task) with one collapse of three of its eight blocks stays far
    better than guessing (61 tokens). Eq. 1 taken literally (merge="rdsc") does much worse than the official
    code's merge, as on SmolLM2-135M (where it reaches perplexities of 1e5 and more)."""
    dense = _trained_tiny_model()
    calibration, text = _progression(4, 12, 10_001), _progression(8, 32, 10_002).flatten()
    before = perplexity(dense, text, seq_len=32).value
    assert before < 10
    after = {}
    for merge in ("official", "rdsc"):
        model, record = get_strategy("laco")(copy.deepcopy(dense), calibration, collapse=3, merge=merge,
                                             progress=False).compress(remove=2)
        assert len(model.model.layers) == 6 and len(record.collapsed) == 1
        after[merge] = perplexity(model, text, seq_len=32).value
    assert math.isfinite(after["official"]) and before < after["official"] < min(61, 4 * before)
    assert after["rdsc"] > 2 * after["official"]


def _without_sublayer(model, block, kind):
    model = copy.deepcopy(model)
    layer = model.model.layers[block]
    with torch.no_grad():
        (layer.self_attn.o_proj if kind == "attention" else layer.mlp.down_proj).weight.zero_()
    return model


def test_blockpruner_removes_sublayers_up_to_the_parameter_budget():
    model = tiny_model(SPEC)
    losses = {(i, kind): mean_nll(_without_sublayer(model, i, kind), [CALIBRATION])
              for i in range(6) for kind in ("attention", "mlp")}
    first = min(losses, key=losses.get)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    before = sum(p.numel() for p in model.parameters())
    model, record = get_strategy("blockpruner")(model, CALIBRATION, progress=False).compress(remove=2)
    assert before - record.method["parameters_effective"] >= 2 * block
    assert len(model.model.layers) == model.config.num_hidden_layers == 6 - len(record.removed)
    for i, kind in record.zeroed:
        position = i - sum(r < i for r in record.removed)
        layer = model.model.layers[position]
        output = layer.self_attn.o_proj if kind == "attention" else layer.mlp.down_proj
        assert not output.weight.any()
    steps = record.scores["order"]
    assert len(steps) == len(record.zeroed) + 2 * len(record.removed)
    assert (steps[0]["block"], steps[0]["sublayer"]) == first
    assert steps[0]["loss"] == pytest.approx(losses[first], rel=1e-5)


def test_prune_only_narrows_every_mlp_to_the_parameter_budget_of_k_blocks():
    model = tiny_model(SPEC)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    before = sum(p.numel() for p in model.parameters())
    width = get_strategy("prune-only")(model, CALIBRATION, progress=False).width_for(2)
    idle = range(SPEC.intermediate_size - width)  # channels that compute nothing: the ones to go
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[idle] = 0
    original = copy.deepcopy(model)
    model, record = get_strategy("prune-only")(model, CALIBRATION, scorer="magnitude",
                                               progress=False).compress(remove=2)
    per_channel = 3 * SPEC.hidden_size * 6  # gate and up rows, down columns, in six blocks
    assert record.mlp_width == (SPEC.intermediate_size, width) == (24, 24 - round(2 * block / per_channel))
    assert model.config.intermediate_size == width and len(model.model.layers) == 6
    assert abs(before - sum(p.numel() for p in model.parameters()) - 2 * block) <= per_channel / 2
    for new, old in zip(model.model.layers, original.model.layers):
        assert new.mlp.up_proj.weight.shape[0] == width
        torch.testing.assert_close(new.self_attn.state_dict(), old.self_attn.state_dict())
        torch.testing.assert_close(new.mlp.gate_proj.weight, old.mlp.gate_proj.weight[len(idle):])
    _same_function(model, original)
    with pytest.raises(ValueError, match="more than all MLP channels hold"):
        get_strategy("prune-only")(tiny_model(SPEC), CALIBRATION).compress(remove=5)


def _angular_distances(model, k, last_only):
    """Brute force: every block boundary (``output_hidden_states``, and the last block's output through a
    hook: the last hidden state has the final norm applied), the mean angular distance between boundary
    ``s`` and ``s + k`` over the last tokens (or all tokens)."""
    last = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda module, args, out: last.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        states = list(model.model(input_ids=CALIBRATION, output_hidden_states=True).hidden_states[:-1]) + last
    hook.remove()
    rows = [(h[:, -1] if last_only else h.reshape(-1, h.shape[-1])).double() for h in states]
    count = len(model.model.layers)
    cos = [torch.nn.functional.cosine_similarity(rows[s], rows[s + k], dim=-1).clamp(-1, 1)
           for s in range(count - k + 1)]
    return [float((torch.arccos(c) / torch.pi).mean()) for c in cos]


@pytest.mark.parametrize("tokens", ["last", "all"])
def test_the_angular_cut_drops_the_run_whose_input_and_output_are_closest(tokens):
    model = tiny_model(SPEC)
    expected = _angular_distances(model, 2, tokens == "last")
    original = copy.deepcopy(model)
    model, record = get_strategy("angular")(model, CALIBRATION, tokens=tokens, progress=False).compress(remove=2)
    assert record.scores["cut_distances"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    first = min(range(5), key=expected.__getitem__)
    assert record.removed == [first, first + 1]
    _same_function(model, remove_blocks(original, [first, first + 1]))


def test_replaceme_folds_the_least_squares_map_into_the_down_proj_before_the_cut():
    """Block s-1 outputs ``r + m T`` with ``T`` the least-squares map from its MLP output ``m`` to what the
    cut run handed on minus ``r``: on the calibration tokens it reproduces the cut's output at least as well
    as the plain drop, and exactly where the run computes a linear function of ``m``."""
    model = tiny_model(SPEC)
    distances = _angular_distances(model, 2, True)
    first = 1 + min(range(4), key=lambda s: distances[s + 1])  # a run after block 0
    original = copy.deepcopy(model)
    with torch.no_grad():
        states = original.model(input_ids=CALIBRATION, output_hidden_states=True).hidden_states
    model, record = get_strategy("replaceme")(model, CALIBRATION, progress=False).compress(remove=2)
    assert record.removed == [first, first + 1] and record.scores["transform_folded_into"] == first - 1
    dropped = remove_blocks(copy.deepcopy(original), [first, first + 1])
    with torch.no_grad():
        ours = model.model(input_ids=CALIBRATION, output_hidden_states=True).hidden_states[first]
        plain = dropped.model(input_ids=CALIBRATION, output_hidden_states=True).hidden_states[first]
    target = states[first + 2]
    assert (ours - target).square().sum() < (plain - target).square().sum()
    for i in range(len(model.model.layers)):  # only block first-1's down_proj changed
        old = dropped.model.layers[i].state_dict()
        for name, tensor in model.model.layers[i].state_dict().items():
            if i == first - 1 and name == "mlp.down_proj.weight":
                assert not torch.equal(tensor, old[name])
            else:
                assert torch.equal(tensor, old[name])


def test_replaceme_leaves_the_model_as_it_was_where_the_cut_run_computes_nothing():
    """Two blocks that add nothing to the residual stream have the smallest (zero) distance and are cut;
    the least squares then give ``T = I``: the model computes what it computed before."""
    model = _identity_blocks(tiny_model(SPEC), [2, 3])
    original = copy.deepcopy(model)
    model, record = get_strategy("replaceme")(model, CALIBRATION, tokens="all", progress=False).compress(remove=2)
    assert record.removed == [2, 3]
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, original.model.layers[1].mlp.down_proj.weight,
                               rtol=1e-4, atol=1e-5)
    _same_function(model, remove_blocks(original, [2, 3]))


@pytest.mark.parametrize("name", ["shortgpt", "sleb", "laco", "blockpruner", "prune-only", "angular", "replaceme"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_every_baseline_saves_a_stock_checkpoint(name, model_type, tmp_path):
    spec = TinySpec(model_type, 2, 2, 2, 4, 24, num_layers=6, bias=model_type == "qwen2", dtype=torch.float32)
    model, record = get_strategy(name)(tiny_model(spec), CALIBRATION, progress=False).compress(remove=1)
    assert isinstance(record, Removal) and record.method["strategy"] == name
    record.save(tmp_path / "removal.json")
    save_checkpoint(model, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    _same_function(model, reloaded)
    ids = CALIBRATION[:1, :4]
    out = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
