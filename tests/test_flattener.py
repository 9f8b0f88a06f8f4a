"""The Flattener end to end on tiny models: sequential calibration, plans, pluggable scorers."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatten import BlockPair, BlockRun, ChannelScorer, Flattener, Plan, check_stock, get_strategy, register_scorer
from flatten.criteria import SCORERS, FixedSpans, FlattenGPTScorer, get_policy
from flatten.engine.executor import Executor
from flatten.evaluation.perplexity import mean_nll
from flatten.merge import remove_blocks
from tiny import TinySpec, tiny_model, tiny_specs

SPEC = TinySpec("qwen2", hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=4, intermediate_size=12,
                num_layers=6, dtype=torch.float32)


def _calibration(samples=6, length=8, seed=0):
    return torch.randint(0, 61, (samples, length), generator=torch.Generator().manual_seed(seed))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@settings(max_examples=8, deadline=None)
@given(spec=tiny_specs(dtypes=(torch.float32,), num_layers=st.integers(3, 6)), data=st.data())
def test_compress_removes_k_blocks_and_the_plan_replays_to_the_same_weights(spec, data, tmp_path_factory):
    model = tiny_model(spec)
    original = copy.deepcopy(model)
    k = data.draw(st.integers(1, spec.num_layers - 1), label="remove")
    scorer = data.draw(st.sampled_from(SCORERS.names()), label="scorer")
    policy = data.draw(st.sampled_from(["greedy", "greedy-recompute"]), label="policy")
    compressed, plan = Flattener(model, _calibration(), scorer=scorer, policy=policy, progress=False).compress(remove=k)

    assert compressed is model
    assert len(model.model.layers) == model.config.num_hidden_layers == spec.num_layers - k
    assert plan.removed == k and sum(c - a for a, c in plan.spans) == k
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan.save(path)
    replayed = Plan.load(path).apply(copy.deepcopy(original))
    assert _same_weights(replayed, model)
    with torch.no_grad():
        assert torch.isfinite(model(_calibration(1)).logits).all()


def test_decisions_are_made_on_the_activations_of_the_compressed_model():
    """The second merge's statistics must come from inputs that went through the first merged block."""
    seen = []

    class Spy(FlattenGPTScorer):
        def select_groups(self, stats, keep):
            seen.append(stats.gram.clone())
            return super().select_groups(stats, keep)

    model = tiny_model(SPEC)
    original = copy.deepcopy(model)
    calibration = _calibration()
    flattener = Flattener(model, calibration, scorer=Spy(), policy=FixedSpans([(0, 1), (3, 4)]), progress=False)
    _, plan = flattener.compress()
    assert [m.span for m in plan.merges] == [(0, 1), (3, 4)]

    # independently: replay the first merge, run the model's own forward, and read what reaches block 2
    after_first = copy.deepcopy(original)
    plan.merges[0].apply(after_first)
    torch.testing.assert_close(seen[1], _o_gram(after_first, 2, calibration), rtol=1e-4, atol=1e-4)
    # ... which is not what the uncompressed model would have given (original blocks 3 and 4)
    assert not torch.allclose(seen[1], _o_gram(original, 3, calibration), rtol=1e-2, atol=1e-2)


def _o_gram(model, index, calibration):
    """Gram of the head outputs of blocks ``index`` and ``index + 1`` flattened, on the inputs that the
    model's own forward pass delivers to block ``index``."""
    wide = BlockPair(model, index).flatten()
    block_inputs, o_inputs = [], []
    pre = model.model.layers[index].register_forward_pre_hook(lambda m, a, k: block_inputs.append((a, k)),
                                                              with_kwargs=True)
    hook = wide.self_attn.o_proj.register_forward_pre_hook(lambda m, a: o_inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for ids in calibration.split(4):
            model(ids, use_cache=False)
        pre.remove()
        for args, kwargs in block_inputs:
            wide(*args, **kwargs)
    hook.remove()
    o = torch.cat(o_inputs).double()
    return o.T @ o


def test_a_scorer_subclass_defined_here_is_used_by_the_flattener():
    calls = {"groups": 0, "channels": 0}

    @register_scorer("test-last-channels")
    class LastChannels(ChannelScorer):
        """Keeps the highest-numbered channels and groups: the second block's."""

        def score_groups(self, stats):
            calls["groups"] += 1
            return torch.arange(stats.shape.num_kv_heads, dtype=torch.float64)

        def score_channels(self, stats):
            calls["channels"] += 1
            return torch.arange(stats.shape.intermediate_size, dtype=torch.float64)

    try:
        model = tiny_model(SPEC)
        _, plan = Flattener(model, _calibration(), scorer="test-last-channels", policy="greedy", select="scorer",
                            progress=False).compress(remove=2)
        calls.update(groups=0, channels=0)
        _, ranked = Flattener(tiny_model(SPEC), _calibration(), scorer="test-last-channels", policy="greedy",
                              select="objective", progress=False).compress(remove=2)  # it ranks, the objective decides
    finally:
        SCORERS.unregister("test-last-channels")
    for merge in plan.merges:
        assert merge.keep_groups == [2, 3] and merge.keep_channels == list(range(12, 24))
        assert merge.o_proj is None and merge.down_proj is None
    assert calls["groups"] >= 2 and calls["channels"] == 2  # channels ranked once per merge
    for merge in ranked.merges:
        assert "1 + 1 / 9 + 3" in merge.selection["residuals"]  # its best of each block: 1 group, 3 of 12 channels
        assert merge.selection["residuals"][f"{merge.selection['groups']} / {merge.selection['channels']}"] == \
            min(merge.selection["residuals"].values())


def test_a_scorer_that_chooses_its_own_channels_is_a_candidate_of_the_objective():
    class EveryOther(ChannelScorer):
        def select_channels(self, stats, keep):
            from flatten.criteria import Choice
            return Choice(torch.arange(0, 2 * keep, 2))

    _, plan = Flattener(tiny_model(SPEC), _calibration(), scorer=EveryOther(), policy="greedy", select="objective",
                        progress=False).compress(remove=1)
    assert any(name.endswith("/ scorer's choice") for name in plan.merges[0].selection["residuals"])


def test_similarity_matches_the_models_own_hidden_states():
    model = tiny_model(SPEC)
    calibration = _calibration()
    similarity = Flattener(model, calibration, progress=False).similarity_matrix()
    with torch.no_grad():
        states = model(calibration, output_hidden_states=True).hidden_states[: SPEC.num_layers]
    units = torch.stack([torch.nn.functional.normalize(h.reshape(-1, h.shape[-1]).double(), dim=-1) for h in states])
    expected = torch.einsum("ind,jnd->ij", units, units) / units.shape[1]
    torch.testing.assert_close(similarity, expected, rtol=1e-5, atol=1e-5)


def test_ratio_counts_parameters_with_embeddings():
    model = tiny_model(SPEC)
    flattener = Flattener(model, _calibration(), progress=False)
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    assert flattener.blocks_for_ratio(2.4 * per_block / total) == 2
    _, plan = flattener.compress(ratio=2.4 * per_block / total)
    assert plan.removed == 2 and plan.method["parameters_before"] - plan.method["parameters_after"] == 2 * per_block


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"remove": 0}, ValueError, "cannot remove 0 of 6 blocks"),
        ({"remove": 6}, ValueError, "cannot remove 6 of 6 blocks"),
        ({"remove": 2.0}, ValueError, "remove must be an int"),
        ({"remove": 2, "ratio": 0.1}, ValueError, "exactly one of remove"),
        ({}, ValueError, "exactly one of remove"),
        ({"ratio": 1.5}, ValueError, r"ratio must be a fraction of the parameters in \(0, 1\)"),
    ],
)
def test_bad_removal_requests(kwargs, error, message):
    with pytest.raises(error, match=message):
        Flattener(tiny_model(SPEC), _calibration(), progress=False).compress(**kwargs)


def test_bad_calibration_data():
    model = tiny_model(SPEC)
    with pytest.raises(ValueError, match=r"must lie in \[0, 61\).*another tokenizer"):
        Flattener(model, torch.full((2, 8), 500))
    with pytest.raises(TypeError, match="2-D integer tensor"):
        Flattener(model, torch.zeros(8))
    with pytest.raises(ValueError, match="empty or too short"):
        Flattener(model, torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="fixed spans .* remove 2 blocks, not 3"):
        Flattener(model, _calibration(), policy=FixedSpans([(0, 2)]), progress=False).compress(remove=3)


def test_a_plan_for_another_model_is_refused(tmp_path):
    model = tiny_model(SPEC)
    _, plan = Flattener(copy.deepcopy(model), _calibration(), progress=False).compress(remove=1)
    other = tiny_model(TinySpec("qwen2", hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=4,
                                intermediate_size=12, num_layers=5))
    with pytest.raises(ValueError, match="made for another model.*num_layers"):
        plan.apply(other)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable plan"):
        Plan.load(tmp_path / "broken.json")


def test_flatten_only_keeps_the_wide_blocks_and_computes_the_flattened_sum():
    spec = TinySpec("llama", 2, 2, 2, 4, 16, num_layers=5, dtype=torch.float64)
    model = tiny_model(spec)
    expected = copy.deepcopy(model)
    BlockPair(expected, 1).replace(BlockPair(expected, 1).flatten())
    calibration = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(0))
    model, plan = Flattener(model, calibration, policy=FixedSpans([(1, 2)]), prune=False, progress=False).compress()
    assert len(model.model.layers) == 4 and plan.method["prune"] is False
    assert model.model.layers[1].mlp.down_proj.weight.shape[1] == 2 * 16
    torch.testing.assert_close(model(calibration).logits, expected(calibration).logits)
    with pytest.raises(ValueError, match="is not a stock checkpoint|prune wide blocks"):
        check_stock(model)
    with pytest.raises(ValueError, match="cannot flatten them again"):
        Flattener(tiny_model(spec), calibration, policy=FixedSpans([(1, 3)]), prune=False, progress=False).compress()


@pytest.mark.parametrize("prune", [False, "refit", "attention", "mlp"])
def test_a_run_flattened_at_once_takes_every_ablation(prune):
    spec = TinySpec("llama", 2, 2, 2, 4, 16, num_layers=6, dtype=torch.float64)
    model = tiny_model(spec)
    expected = copy.deepcopy(model)
    calibration = torch.randint(0, 61, (4, 8), generator=torch.Generator().manual_seed(0))
    model, plan = Flattener(model, calibration, policy="cut-flatten", prune=prune, progress=False).compress(remove=2)
    (merge,) = plan.merges
    assert len(model.model.layers) == 4 and merge.count == 3 and plan.method["prune"] == prune
    assert plan.describe().startswith(f"flattened {merge.position}+{merge.position + 1}-{merge.position + 2} (")
    assert f"prune={prune}: kept wide" in plan.describe()
    wide = model.model.layers[merge.position]
    assert wide.mlp.down_proj.weight.shape[1] == (16 if prune == "mlp" else 3 * 16)
    assert wide.self_attn.k_proj.weight.shape[0] == (2 * 4 if prune == "attention" else 3 * 2 * 4)
    if prune is False:
        BlockRun(expected, merge.position, 3).replace(BlockRun(expected, merge.position, 3).flatten())
        torch.testing.assert_close(model(calibration).logits, expected(calibration).logits)


def test_merges_in_isolation_are_the_blocks_a_single_merge_would_build():
    spec = TinySpec("qwen2", 2, 2, 2, 4, 16, num_layers=6, bias=True, dtype=torch.float64)
    calibration = _calibration()
    model = tiny_model(spec)
    before = copy.deepcopy(model)
    found = list(Flattener(model, calibration, progress=False).merges_in_isolation([3, 1]))
    assert [i for i, _, _ in found] == [1, 3] and _same_weights(model, before)
    for i, wide, merged in found:
        single, _ = Flattener(copy.deepcopy(before), calibration, policy=FixedSpans([(i, i + 1)]),
                              progress=False).compress()
        assert _same_weights(merged, single.model.layers[i])
        assert _same_weights(wide, BlockPair(copy.deepcopy(before), i).flatten())
    for bad in ([], [5], [-1], [True]):
        with pytest.raises(ValueError, match=r"positions must be block indices 0\.\.4"):
            next(Flattener(model, calibration, progress=False).merges_in_isolation(bad))


def test_fitting_to_the_dense_model_changes_only_the_merges_above_another():
    """fit_to="dense": the first merge sees the dense model's input, so it is the same as with "pair"; a merge
    above it fits the dense model's activations, which its least-squares refit then reproduces better."""
    spec = TinySpec("qwen2", 2, 2, 2, 4, 16, num_layers=6, bias=True, dtype=torch.float64)
    calibration, spans = _calibration(samples=8, length=16), FixedSpans([(0, 1), (3, 4)])
    dense = tiny_model(spec)
    runs = {fit: Flattener(copy.deepcopy(dense), calibration, policy=spans, progress=False, fit_to=fit).compress()
            for fit in ("pair", "dense")}
    (pair, pair_plan), (fitted, fitted_plan) = runs["pair"], runs["dense"]
    assert _same_weights(pair.model.layers[0], fitted.model.layers[0])
    assert not torch.equal(pair.model.layers[2].mlp.down_proj.weight, fitted.model.layers[2].mlp.down_proj.weight)
    assert fitted_plan.method["fit_to"] == "dense" and pair_plan.method["fit_to"] == "pair"

    def after(model, blocks):  # hidden states after that many blocks
        return model(calibration, output_hidden_states=True).hidden_states[blocks]

    target = after(dense, 5)
    errors = {fit: (after(model, 3) - target).square().sum() for fit, (model, _) in runs.items()}
    assert errors["dense"] < errors["pair"]
    with pytest.raises(ValueError, match="fit_to must be one of 'pair', 'dense', got 'teacher'"):
        Flattener(dense, calibration, fit_to="teacher")


@pytest.mark.parametrize("half", ["attention", "mlp"])
def test_pruning_only_one_half_leaves_the_other_wide(half):
    """The ablations prune="attention" / "mlp": the pruned half has the model's width, the other keeps both
    blocks' heads or channels; prune="attention" keeps the KV groups a full run keeps."""
    spec = TinySpec("qwen2", 2, 2, 2, 4, 16, num_layers=5, bias=True, dtype=torch.float64)
    calibration = torch.randint(0, 61, (4, 8), generator=torch.Generator().manual_seed(0))
    model, plan = Flattener(tiny_model(spec), calibration, policy=FixedSpans([(1, 2)]), prune=half,
                            progress=False).compress()
    block = model.model.layers[1]
    groups = block.self_attn.k_proj.weight.shape[0] // spec.head_dim
    channels = block.mlp.down_proj.weight.shape[1]
    assert (groups, channels) == ((2, 32) if half == "attention" else (4, 16))
    assert plan.method["prune"] == half and torch.isfinite(model(calibration).logits).all()
    _, full = Flattener(tiny_model(spec), calibration, policy=FixedSpans([(1, 2)]), progress=False).compress()
    if half == "attention":
        assert plan.merges[0].keep_groups == full.merges[0].keep_groups
    with pytest.raises(ValueError, match="prune must be one of True, False, 'refit', 'attention', 'mlp', got 'heads'"):
        Flattener(tiny_model(spec), calibration, prune="heads")


def test_loss_search_takes_the_merge_or_drop_after_which_the_search_loss_is_lowest():
    """Every candidate is scored by the loss on the search rows of the model after it alone; a merge tried is
    built on the other rows (as a one-merge compression on them would build it), and the chosen one is put
    in as built. With every drop among the candidates, the first choice is at least as good as SLEB's."""
    spec = TinySpec("llama", 2, 2, 2, 4, 16, num_layers=5, dtype=torch.float64)
    calibration = torch.randint(0, 61, (6, 10), generator=torch.Generator().manual_seed(1))
    search, fit = calibration[:2], calibration[2:]
    expected = {}
    for i in range(4):
        merged, _ = Flattener(tiny_model(spec), fit, policy=FixedSpans([(i, i + 1)]), batch_size=2,
                              progress=False).compress()
        expected[f"merge {i}+{i + 1}"] = mean_nll(merged, [search])
    for i in range(5):
        expected[f"drop {i}"] = mean_nll(remove_blocks(tiny_model(spec), [i]), [search])
    policy = get_policy("loss-search", search_samples=2, merges=None, absorbs=0, drops=None, keep_last=0)
    model, plan = Flattener(tiny_model(spec), calibration, policy=policy, batch_size=2, progress=False).compress(remove=2)
    tried = plan.method["search"][0]["tried"]
    assert tried == pytest.approx(expected, rel=1e-9)
    best = min(expected, key=expected.get)
    first = plan.merges[0]
    kept = first.kept(spec.num_kv_heads, spec.intermediate_size)
    assert best == (f"merge {first.position}+{first.position + 1}" if kept == "both" else
                    f"drop {first.position + (kept == 'first')}")
    _, sleb = get_strategy("sleb")(tiny_model(spec), calibration, search_samples=2, batch_size=2,
                                   progress=False).compress(remove=1)
    assert expected[best] <= min(sleb.scores["candidate_losses"][0]) + 1e-12
    assert len(model.model.layers) == 3 and len(plan.method["search"]) == 2
    replayed = plan.apply(tiny_model(spec))
    torch.testing.assert_close(replayed(calibration).logits, model(calibration).logits)


@pytest.mark.parametrize("fit_to", ["pair", "dense"])
def test_an_absorbed_block_is_fitted_into_its_neighbour(fit_to):
    """Absorbing block i keeps block i - 1's heads and channels. Without compensation (the magnitude scorer)
    that is dropping block i; with the default scorer's, the kept block reproduces what the two computed
    (on the rows it was fitted to) better than the plain drop does."""
    spec = TinySpec("llama", 2, 2, 2, 4, 16, num_layers=5, dtype=torch.float64)
    calibration = torch.randint(0, 61, (6, 10), generator=torch.Generator().manual_seed(2))
    only = get_policy("loss-search", search_samples=2, merges=0, absorbs=None, drops=0)
    plain, plan = Flattener(tiny_model(spec), calibration, scorer="magnitude", policy=only, batch_size=2,
                            progress=False, fit_to=fit_to).compress(remove=1)
    absorbed = int(min(plan.method["search"][0]["tried"], key=plan.method["search"][0]["tried"].get).split()[1])
    assert plan.merges[0].kept(2, 16) == ("first" if absorbed else "second")
    _same_function = lambda a, b: torch.testing.assert_close(a(calibration).logits, b(calibration).logits)
    _same_function(plain, remove_blocks(tiny_model(spec), [absorbed]))

    fit = calibration[2:]
    model, plan = Flattener(tiny_model(spec), calibration, policy=only, batch_size=2, progress=False,
                            fit_to=fit_to).compress(remove=1)
    absorbed = int(min(plan.method["search"][0]["tried"], key=plan.method["search"][0]["tried"].get).split()[1])
    assert plan.merges[0].down_proj is not None and "absorbed" in plan.describe()
    end = absorbed + 1 if absorbed else 2  # the hidden state after the pair, and after its one block
    target = tiny_model(spec)(fit, output_hidden_states=True).hidden_states[end]
    dropped = remove_blocks(tiny_model(spec), [absorbed])(fit, output_hidden_states=True).hidden_states[end - 1]
    ours = model(fit, output_hidden_states=True).hidden_states[end - 1]
    assert (ours - target).square().sum() < (dropped - target).square().sum()
    torch.testing.assert_close(plan.apply(tiny_model(spec))(calibration).logits, model(calibration).logits)


def test_the_cut_absorbs_the_run_of_least_angular_distance_into_the_block_before_it():
    spec = TinySpec("llama", 2, 2, 2, 4, 16, num_layers=6, dtype=torch.float64)
    calibration = torch.randint(0, 61, (6, 10), generator=torch.Generator().manual_seed(2))
    distances = get_strategy("angular")(tiny_model(spec), calibration, tokens="last", batch_size=2,
                                        progress=False).cut_distances(2)
    start = 1 + min(range(len(distances) - 1), key=lambda s: float(distances[s + 1]))  # a block before the run
    plain, plan = Flattener(tiny_model(spec), calibration, scorer="magnitude", policy="cut", batch_size=2,
                            progress=False).compress(remove=2)
    assert plan.method["cut_distances"] == pytest.approx(distances.tolist())
    assert plan.spans == [(start - 1, start + 1)] and plan.removed_blocks()["dropped"] == [(start, start), (start + 1, start + 1)]
    torch.testing.assert_close(plain(calibration).logits, remove_blocks(tiny_model(spec), [start, start + 1])(calibration).logits)
    spans, _ = Flattener(tiny_model(spec), calibration, policy="cut", batch_size=2, progress=False).plan_spans(remove=2)
    assert spans[start - 1] == (start - 1, start + 1) and len(spans) == 4

    policy = get_policy("cut", merges=True, search_samples=2)
    model, plan = Flattener(tiny_model(spec), calibration, policy=policy, batch_size=2, progress=False).compress(remove=2)
    for step, merge in zip(plan.method["search"], plan.merges):
        tried = step["tried"]
        merged = tried[f"merge {start - 1}+{start}"] < tried[f"absorb {start}"]
        assert merge.position == start - 1 and (merge.kept(2, 16) == "both") == merged
    with pytest.raises(ValueError, match="a cut after block 0 removes at most 4 of 6 blocks"):
        Flattener(tiny_model(spec), calibration, policy="cut", progress=False).compress(remove=5)


def test_a_run_of_absorbs_runs_each_original_block_once_for_its_dense_targets():
    model = tiny_model(TinySpec("llama", 2, 2, 2, 8, 40, num_layers=8, dtype=torch.float32))
    runs = [0] * 8
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda module, args, output, i=i: runs.__setitem__(i, runs[i] + 1))
    _, plan = Flattener(model, _calibration(8, 16, seed=5), batch_size=8, progress=False).compress(remove=4)
    first, last = plan.spans[0]
    assert last - first == 4
    # the similarity pass and the dense targets (a chain of four absorbs ran blocks 5, 4, 3 and 2 times before)
    assert runs[first:] == [2] * (8 - first)


def test_loss_search_shortlists_by_block_influence():
    spec = TinySpec("llama", 2, 2, 2, 4, 16, num_layers=6, dtype=torch.float64)
    calibration = torch.randint(0, 61, (6, 10), generator=torch.Generator().manual_seed(1))
    influence = get_strategy("shortgpt")(tiny_model(spec), calibration[:2], progress=False).block_influence()
    pairs = sorted(range(4), key=lambda i: float(influence[i] + influence[i + 1]))[:2]  # keep_last=1: 5 open blocks
    blocks = sorted(range(5), key=lambda i: float(influence[i]))[:1]
    policy = get_policy("loss-search", search_samples=2, merges=2, absorbs=1, drops=1)
    _, plan = Flattener(tiny_model(spec), calibration, policy=policy, batch_size=2, progress=False).compress(remove=1)
    assert set(plan.method["search"][0]["tried"]) == ({f"merge {i}+{i + 1}" for i in pairs} | {f"drop {i}" for i in blocks}
                                                      | {f"absorb {i}" for i in blocks})
    with pytest.raises(ValueError, match="merges, absorbs and drops cannot all be 0"):
        get_policy("loss-search", merges=0, absorbs=0, drops=0)
    with pytest.raises(ValueError, match="search_samples must be an int >= 1, got 0"):
        get_policy("loss-search", search_samples=0)


def test_bfloat16_weights_give_the_float32_result_within_rounding():
    """Statistics accumulate in float64 whatever the weight dtype: with the spans fixed, a bf16 model keeps
    the same KV groups and nearly the same channels as its fp32 original, and stays bf16."""
    spec = TinySpec("llama", hidden_multiple=4, num_kv_heads=2, group_size=2, head_dim=8, intermediate_size=48,
                    num_layers=6, dtype=torch.float32)
    calibration, spans = _calibration(samples=8, length=32, seed=1), FixedSpans([(1, 2), (3, 4)])
    full = tiny_model(spec)
    half = copy.deepcopy(full).to(torch.bfloat16)
    full, plan32 = Flattener(full, calibration, policy=spans, progress=False).compress()
    half, plan16 = Flattener(half, calibration, policy=spans, progress=False).compress()
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    for a, b in zip(plan32.merges, plan16.merges):
        assert a.keep_groups == b.keep_groups
        assert len(set(a.keep_channels) & set(b.keep_channels)) >= 0.9 * len(a.keep_channels)
    ids = calibration[:2]
    expected = full(input_ids=ids).logits
    error = (half.float()(input_ids=ids).logits - expected).norm() / expected.norm()
    assert error < 0.1


@pytest.mark.parametrize("policy, options", [("greedy", {}), ("greedy-recompute", {}), ("trial-loss", {}),
                                             ("loss-search", {}), ("greedy", {"fit_to": "dense"}),
                                             ("loss-search", {"fit_to": "dense", "batch_size": 2}),
                                             (get_policy("cut", merges=True), {"fit_to": "dense"})])
def test_an_interrupted_compression_resumes_to_the_same_weights(policy, options, tmp_path, monkeypatch):
    original, calibration, checkpoint = tiny_model(SPEC), _calibration(), tmp_path / "progress.json"
    whole, plan = Flattener(copy.deepcopy(original), calibration, policy=policy, progress=False,
                            **options).compress(remove=3)

    take, merged = Executor.take, []

    def interrupted_after_two(self, *args):
        if len(merged) == 2:
            raise KeyboardInterrupt
        merge = take(self, *args)
        merged.append(tuple(merge.span))
        return merge

    monkeypatch.setattr(Executor, "take", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        Flattener(copy.deepcopy(original), calibration, policy=policy, progress=False,
                  checkpoint=checkpoint, **options).compress(remove=3)
    monkeypatch.undo()
    assert [tuple(m.span) for m in Plan.load(checkpoint).merges] == merged

    for changed, says in [({"calibration": _calibration(seed=1)}, "calibration"), ({"remove": 2}, "remove 3, now 2")]:
        with pytest.raises(ValueError, match=says):
            Flattener(copy.deepcopy(original), changed.get("calibration", calibration), policy=policy,
                      progress=False, checkpoint=checkpoint, **options).compress(remove=changed.get("remove", 3))

    resumed, again = Flattener(copy.deepcopy(original), calibration, policy=policy, progress=False,
                               checkpoint=checkpoint, **options).compress(remove=3)
    assert _same_weights(resumed, whole) and again.spans == plan.spans
    assert Plan.load(checkpoint).removed == 3


def test_a_safetensors_folder_stays_on_disk_while_it_is_compressed(tiny):
    """Loaded in its stored dtype, a checkpoint folder's weights are memory-mapped file pages; compression
    reads them and leaves the blocks it does not merge in the file, not copied into memory."""
    from flatten import load_model
    from flatten.evaluation.measure import file_backed_fraction

    model, _ = load_model(tiny[0], dtype="auto")
    assert file_backed_fraction(model.model.layers) == 1.0
    untouched = {i: model.model.layers[i] for i in (0, 3, 4)}
    spans = FixedSpans([(1, 2)])
    model, _ = Flattener(model, _calibration(), policy=spans, progress=False).compress()
    assert [model.model.layers[i] for i in (0, 2, 3)] == list(untouched.values())
    assert file_backed_fraction(torch.nn.ModuleList(untouched.values())) == 1.0
    assert file_backed_fraction(model.model.layers[1]) == 0.0  # the merged block is new


def test_the_one_block_fallback_keeps_the_first_block_where_the_second_adds_nothing():
    """Block 2 adds nothing to its input: of the pair (1, 2), keeping block 1 alone reproduces the pair
    exactly, better than any pruned merge (with random channels here), and the result is block 1."""
    from flatten.merge import remove_blocks

    model = tiny_model(SPEC)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    expected = remove_blocks(copy.deepcopy(model), [2])
    model, plan = Flattener(model, _calibration(), scorer="random", policy=FixedSpans([(1, 2)]),
                            one_block_fallback=True, progress=False).compress()
    (choice,) = plan.method["merge_choices"]
    assert choice["chosen"] == "first block only" and choice["unexplained"]["first block only"] < 1e-12
    assert choice["unexplained"]["merged"] > 1e-3
    groups = model.config.num_key_value_heads
    assert plan.merges[0].keep_groups == list(range(groups)) and plan.merges[0].o_proj is None
    ids = _calibration()[:2]
    torch.testing.assert_close(model(input_ids=ids).logits, expected(input_ids=ids).logits)


@pytest.mark.parametrize("scorer, chosen", [("reconstruction", "first block only"), ("random", "merged")])
def test_the_loss_fallback_keeps_the_candidate_of_lowest_calibration_loss(scorer, chosen):
    """As above, judged by the model's loss on the first calibration batch. Without block 2 the model is the
    original; without block 1 it is the original less block 1; the kept candidate gives the model its loss.
    (On this random model a random merge happens to lower the loss: the merge is kept there.)"""

    model = tiny_model(SPEC)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    batch = [_calibration()[:4]]
    without = {block: mean_nll(remove_blocks(copy.deepcopy(model), [block]), batch) for block in (1, 2)}
    model, plan = Flattener(model, _calibration(), scorer=scorer, policy=FixedSpans([(1, 2)]),
                            one_block_fallback="loss", progress=False).compress()
    (choice,) = plan.method["merge_choices"]
    assert choice["loss"]["first block only"] == pytest.approx(without[2], rel=1e-6)
    assert choice["loss"]["second block only"] == pytest.approx(without[1], rel=1e-6)
    assert choice["chosen"] == min(choice["loss"], key=choice["loss"].get) == chosen
    assert mean_nll(model, batch) == pytest.approx(choice["loss"][chosen], rel=1e-6)


def test_without_the_fallback_the_pruned_merge_is_kept():
    model = tiny_model(SPEC)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.zero_()
        model.model.layers[2].self_attn.o_proj.weight.zero_()
    _, plan = Flattener(model, _calibration(), scorer="random", policy=FixedSpans([(1, 2)]), progress=False,
                        one_block_fallback=False).compress()
    assert "merge_choices" not in plan.method and plan.method["one_block_fallback"] is False
    assert plan.merges[0].keep_channels != list(range(SPEC.intermediate_size))  # random channels of both blocks
    with pytest.raises(ValueError, match="one_block_fallback must be one of False, True, 'reconstruction', 'loss', "
                                         "got 'yes'"):
        Flattener(model, _calibration(), one_block_fallback="yes")
    with pytest.raises(ValueError, match="already chooses each merge by the loss"):
        Flattener(model, _calibration(), policy="trial-loss", one_block_fallback="loss")
    with pytest.raises(ValueError, match="token_weighting must be one of 'none', 'input-rms', got 'rms'"):
        Flattener(model, _calibration(), token_weighting="rms")
