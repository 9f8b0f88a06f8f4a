"""A merge chosen by its objective (``select="objective"``) never misses its target by more than the absorb
(keeping the first block whole, its ``down_proj`` refitted) that is among its candidates; ``select="held-out"``
judges the candidates on calibration batches they were not refitted on."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatten import BlockPair, BlockRun, Flattener, Plan, get_scorer, get_strategy
from flatten.calibration import run_block
from flatten.criteria import SCORERS, get_policy
from flatten.recipe import merge_pair, pair_outputs, refit_only, run_output
from tiny import TinySpec, pair_inputs, tiny_model, tiny_specs


def _missed(block, hidden, calls, targets) -> float:
    """``sum ||block(x) - target||^2`` over the calibration tokens."""
    return sum(float((y.double() - t.double()).square().sum())
               for y, t in zip(run_block(block, hidden, calls), targets))


@settings(max_examples=12, deadline=None)
@given(spec=tiny_specs(dtypes=(torch.float64,), num_layers=st.integers(2, 4)),
       scorer=st.sampled_from(SCORERS.names()), data=st.data())
def test_the_objective_merge_never_misses_the_target_more_than_the_absorb(spec, scorer, data):
    model = tiny_model(spec)
    position = data.draw(st.integers(0, spec.num_layers - 2))
    calibration = torch.randint(0, 61, (4, 9), generator=torch.Generator().manual_seed(spec.seed))
    pair, hidden, calls = pair_inputs(model, position, calibration)
    targets = pair_outputs(pair, hidden, calls, None)[1]
    absorb, _ = merge_pair(pair, get_scorer(scorer), hidden, calls, targets=targets, keep="first")
    chosen, merge = merge_pair(pair, get_scorer(scorer), hidden, calls, targets=targets, select="objective")

    missed_absorb, missed_chosen = _missed(absorb, hidden, calls, targets), _missed(chosen, hidden, calls, targets)
    # float64 models: float64 statistics
    assert missed_chosen <= missed_absorb * (1 + 1e-9) + 1e-12
    # the statistics' residual is the distance of the block's output from the target
    residuals = merge.selection["residuals"]
    assert residuals["block 1 whole / block 1 whole"] == pytest.approx(missed_absorb, rel=1e-9, abs=1e-12)
    picked = residuals[f"{merge.selection['groups']} / {merge.selection['channels']}"]
    assert picked == min(residuals.values())
    assert picked == pytest.approx(missed_chosen, rel=1e-9, abs=1e-12)
    assert len(BlockPair(model, position).model.model.layers) == spec.num_layers  # the model is unchanged


@settings(max_examples=8, deadline=None)
@given(spec=tiny_specs(dtypes=(torch.float64,), num_layers=st.integers(3, 5)),
       scorer=st.sampled_from(SCORERS.names()), data=st.data())
def test_a_run_flattened_at_once_never_misses_the_target_more_than_the_absorb_of_the_run(spec, scorer, data):
    model = tiny_model(spec)
    count = data.draw(st.integers(3, spec.num_layers))
    position = data.draw(st.integers(0, spec.num_layers - count))
    calibration = torch.randint(0, 61, (4, 9), generator=torch.Generator().manual_seed(spec.seed))
    _, hidden, calls = pair_inputs(model, position, calibration)
    run = BlockRun(model, position, count)
    targets = run_output(run, hidden, calls, None)
    absorb, _ = merge_pair(run, get_scorer(scorer), hidden, calls, targets=targets, keep="first")
    chosen, merge = merge_pair(run, get_scorer(scorer), hidden, calls, targets=targets, select="objective")

    missed_absorb, missed_chosen = _missed(absorb, hidden, calls, targets), _missed(chosen, hidden, calls, targets)
    assert missed_chosen <= missed_absorb * (1 + 1e-9) + 1e-12
    residuals = merge.selection["residuals"]
    assert {f"block {i + 1} whole / block {i + 1} whole" for i in range(count)} <= set(residuals)
    assert residuals["block 1 whole / block 1 whole"] == pytest.approx(missed_absorb, rel=1e-9, abs=1e-12)
    assert residuals[f"{merge.selection['groups']} / {merge.selection['channels']}"] == pytest.approx(
        missed_chosen, rel=1e-9, abs=1e-12)
    assert (merge.position, merge.span, merge.count) == (position, (position, position + count - 1), count)



@settings(max_examples=8, deadline=None)
@given(spec=tiny_specs(dtypes=(torch.float64,), num_layers=st.integers(2, 4)),
       scorer=st.sampled_from(SCORERS.names()), data=st.data())
def test_a_refitted_wide_block_never_misses_the_target_more_than_the_flattened_one(spec, scorer, data):
    model = tiny_model(spec)
    count = data.draw(st.integers(2, spec.num_layers))
    position = data.draw(st.integers(0, spec.num_layers - count))
    calibration = torch.randint(0, 61, (4, 9), generator=torch.Generator().manual_seed(spec.seed))
    _, hidden, calls = pair_inputs(model, position, calibration)
    run = BlockRun(model, position, count)
    targets = run_output(run, hidden, calls, None)
    refitted, merge = refit_only(run, get_scorer(scorer), hidden, calls, targets=targets)

    assert merge.keep_channels == list(range(count * spec.intermediate_size))
    assert _missed(refitted, hidden, calls, targets) <= _missed(run.flatten(), hidden, calls, targets) * (1 + 1e-9) + 1e-12

def test_the_objective_takes_the_absorb_where_the_second_block_does_nothing():
    """With the second block's writers zeroed, the pair computes what the first block does: keeping the first
    block whole reproduces it exactly, so the objective chooses it (and records an absorb)."""
    spec = TinySpec("llama", 2, 2, 2, 4, 16, num_layers=3, dtype=torch.float64)
    model = tiny_model(spec)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    calibration = torch.randint(0, 61, (4, 9), generator=torch.Generator().manual_seed(3))
    pair, hidden, calls = pair_inputs(model, 0, calibration)
    _, merge = merge_pair(pair, get_scorer("reconstruction"), hidden, calls, select="objective")
    assert merge.kept(2, 16) == "first"
    assert min(merge.selection["residuals"].values()) < 1e-12 * max(merge.selection["residuals"].values())


def test_the_cut_merges_with_the_objective_and_the_plan_replays():
    spec = TinySpec("qwen2", 2, 2, 2, 4, 12, num_layers=6, bias=True, dtype=torch.float64)
    calibration = torch.randint(0, 61, (6, 10), generator=torch.Generator().manual_seed(4))
    model, plan = Flattener(tiny_model(spec), calibration, batch_size=2, progress=False, select="objective",
                            policy=get_policy("cut", step="merge")).compress(remove=2)
    assert len(model.model.layers) == 4
    assert all(m.selection is not None for m in plan.merges)
    torch.testing.assert_close(plan.apply(tiny_model(spec))(calibration).logits, model(calibration).logits)


def test_held_out_judges_each_candidate_on_batches_it_was_not_refitted_on():
    spec = TinySpec("qwen2", 2, 2, 2, 4, 12, num_layers=3, bias=True, dtype=torch.float64)
    calibration = torch.randint(0, 61, (8, 9), generator=torch.Generator().manual_seed(6))
    pair, hidden, calls = pair_inputs(tiny_model(spec), 0, calibration)  # four batches
    targets = pair_outputs(pair, hidden, calls, None)[1]
    even, odd = slice(0, None, 2), slice(1, None, 2)
    absorb, _ = merge_pair(pair, get_scorer("reconstruction"), hidden[even], calls[even], targets=targets[even],
                           keep="first")
    _, merge = merge_pair(pair, get_scorer("reconstruction"), hidden, calls, targets=targets, select="held-out")

    residuals = merge.selection["residuals"]
    assert merge.selection["judged_on"] == "held-out batches"
    assert residuals["block 1 whole / block 1 whole"] == pytest.approx(
        _missed(absorb, hidden[odd], calls[odd], targets[odd]), rel=1e-9, abs=1e-12)
    assert residuals[f"{merge.selection['groups']} / {merge.selection['channels']}"] == min(residuals.values())
    with pytest.raises(ValueError, match="at least two batches, got 1"):
        merge_pair(pair, get_scorer("reconstruction"), hidden[:1], calls[:1], targets=targets[:1], select="held-out")


def test_cut_flatten_flattens_the_run_once_and_its_plan_saves_and_replays(tmp_path):
    spec = TinySpec("qwen2", 2, 2, 2, 4, 12, num_layers=6, bias=True, dtype=torch.float64)
    calibration = torch.randint(0, 61, (6, 10), generator=torch.Generator().manual_seed(4))
    model, plan = get_strategy("cut-flatten")(tiny_model(spec), calibration, batch_size=2,
                                              progress=False).compress(remove=3)
    assert len(model.model.layers) == 3 and plan.removed == 3
    [merge] = plan.merges
    assert merge.count == 4 and merge.span == (merge.position, merge.position + 3)
    kinds = {kind for kind, _, _ in plan.steps()}
    assert kinds == {"merged"} if merge.whole_block(2, 12) is None else kinds <= {"absorbed", "dropped"}
    assert len(plan.steps()) == (1 if kinds == {"merged"} else 3)
    torch.testing.assert_close(plan.apply(tiny_model(spec))(calibration).logits, model(calibration).logits)
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.merges[0].count == 4 and loaded.removed == 3
    torch.testing.assert_close(loaded.apply(tiny_model(spec))(calibration).logits, model(calibration).logits)
