"""Scorer and policy contracts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatten import BlockPair, architecture_for
from flatten.calibration import add_upper_gram, attention_stats, capture, mlp_stats, symmetric
from flatten.criteria import (
    POLICIES,
    MlpStats,
    SCORERS,
    SIMILARITIES,
    FixedSpans,
    GreedySimilarity,
    get_policy,
    get_scorer,
    ridge_leverage,
    ridge_refit,
    top,
)
from flatten.criteria.scorers import cholesky_solve, refit_residual
from flatten.merge import select_block
from tiny import tiny_model, tiny_specs


def _wide_stats(spec, seed, with_target):
    model = tiny_model(spec)
    arch = architecture_for(model)
    pair = BlockPair(model, 0)
    wide = pair.flatten()
    shape = arch.block_shape(wide, model.config)
    ids = torch.randint(0, 61, (3, 6), generator=torch.Generator().manual_seed(seed))
    inputs = capture(model, arch, list(ids.split(2)))
    attention = attention_stats(wide, arch, shape, inputs.hidden, inputs.calls[0])
    half = select_block(wide, arch, model.config, 0, range(spec.num_kv_heads), range(shape.intermediate_size))
    targets = [torch.randn_like(h) for h in inputs.hidden] if with_target else None
    mlp = mlp_stats(half, arch, shape, inputs.hidden, inputs.calls[0], targets)
    return model, attention, mlp


@pytest.mark.parametrize("name", SCORERS.names())
@settings(max_examples=8, deadline=None)
@given(spec=tiny_specs(), seed=st.integers(0, 100))
def test_every_scorer_returns_a_valid_selection(name, spec, seed):
    scorer = get_scorer(name)
    model, attention, mlp = _wide_stats(spec, seed, scorer.needs_target)
    groups = scorer.select_groups(attention, spec.num_kv_heads)
    channels = scorer.select_channels(mlp, spec.intermediate_size)
    for choice, keep, available in ((groups, spec.num_kv_heads, 2 * spec.num_kv_heads),
                                    (channels, spec.intermediate_size, 2 * spec.intermediate_size)):
        kept = choice.keep.tolist()
        assert kept == sorted(set(kept)) and len(kept) == keep and 0 <= kept[0] and kept[-1] < available
    if groups.weight is not None:
        assert groups.weight.shape == (spec.hidden_size, spec.num_heads * spec.head_dim)
        assert torch.isfinite(groups.weight).all()
    if channels.weight is not None:
        assert channels.weight.shape == (spec.hidden_size, spec.intermediate_size)
        assert torch.isfinite(channels.weight).all()


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 12), extra=st.integers(0, 30), seed=st.integers(0, 1000), ridge=st.floats(1e-3, 100))
def test_ridge_leverage_is_the_diagonal_of_the_hat_matrix(n, extra, seed, ridge):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n + extra, n, generator=g, dtype=torch.float64)
    c = a.T @ a
    lam = ridge * torch.trace(c) / n
    expected = torch.diagonal(c @ torch.linalg.inv(c + lam * torch.eye(n, dtype=torch.float64)))
    before = c.clone()
    got = ridge_leverage(c, ridge)
    torch.testing.assert_close(got, expected)
    for block in (max(1, n // 3), 1):  # block 1: the last quarter's columns are solved on a trailing square
        torch.testing.assert_close(ridge_leverage(c, ridge, block=block), expected)
    assert torch.equal(c, before)  # shifted for the factorisation, then restored exactly
    assert bool((got >= 0).all() and (got <= 1).all())


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 12), d=st.integers(1, 6), seed=st.integers(0, 1000))
def test_cholesky_solve_by_triangular_solves_matches_torch(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2 * n + 1, n, generator=g, dtype=torch.float64)
    factor = torch.linalg.cholesky(a.T @ a + torch.eye(n, dtype=torch.float64))
    rhs = torch.randn(n, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(cholesky_solve(factor, rhs), torch.cholesky_solve(rhs, factor))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 10), d=st.integers(1, 6), seed=st.integers(0, 1000))
def test_ridge_refit_solves_the_least_squares_problem(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    w = torch.randn(d, n, generator=g, dtype=torch.float64)
    y = a @ w.T
    keep = torch.arange(0, n, 2)
    # a vanishing ridge gives the plain least-squares fit of the full output from the kept inputs
    got = ridge_refit(a.T @ a, a.T @ y, keep, w, 1e-12)
    expected = torch.linalg.lstsq(a[:, keep], y).solution.T
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)
    # keeping everything reproduces the weight exactly; the Gram matrix, factorised without a copy, is restored
    gram = a.T @ a
    before = gram.clone()
    torch.testing.assert_close(ridge_refit(gram, a.T @ y, torch.arange(n), w, 1e-12), w, rtol=1e-6, atol=1e-8)
    assert torch.equal(gram, before)
    # with every input kept, the ridge solution is that of the shifted normal equations
    lam = 0.5 * before.diagonal().mean()
    y = y + torch.randn(y.shape, generator=g, dtype=torch.float64)
    expected = torch.linalg.solve(before + lam * torch.eye(n, dtype=torch.float64), a.T @ y + lam * w.T).T
    torch.testing.assert_close(ridge_refit(gram, a.T @ y, torch.arange(n), w, 0.5), expected)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 10), d=st.integers(1, 6), seed=st.integers(0, 1000))
def test_refit_residual_is_the_squared_miss_of_the_target(n, d, seed):
    """For a subset of channels and for all of them (the Gram matrix then used as it is, not copied)."""
    g = torch.Generator().manual_seed(seed)
    psi = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    target = torch.randn(3 * n, d, generator=g, dtype=torch.float64)
    down = torch.randn(d, n, generator=g, dtype=torch.float64)
    stats = MlpStats(shape=None, weights={"down": down}, gram=psi.T @ psi, target_cross=psi.T @ target,
                     tokens=3 * n, target_energy=float(target.square().sum()))
    before = stats.gram.clone()
    for keep in (torch.arange(0, n, 2), torch.arange(n)):
        weight = torch.randn(d, len(keep), generator=g, dtype=torch.float64)
        for w in (None, weight):
            used = down[:, keep] if w is None else w
            expected = float((psi[:, keep] @ used.T - target).square().sum())
            assert refit_residual(stats, keep, w) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert torch.equal(stats.gram, before)


def test_top_keeps_the_highest_scores_in_ascending_order():
    assert top(torch.tensor([0.1, 5.0, 3.0, 5.0]), 2).tolist() == [1, 3]
    with pytest.raises(ValueError, match="non-finite"):
        top(torch.tensor([0.1, float("nan")]), 1)


def test_greedy_merges_the_most_similar_span_ends():
    s = torch.tensor([[1.0, 0.5, 0.4, 0.1],
                      [0.5, 1.0, 0.9, 0.3],
                      [0.4, 0.9, 1.0, 0.8],
                      [0.1, 0.3, 0.8, 1.0]])
    policy = GreedySimilarity(keep_last=0)
    groups = [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert policy.next_merge(s, groups) == 1  # S[1, 2] = 0.9
    groups = [(0, 0), (1, 2), (3, 3)]
    assert policy.next_merge(s, groups) == 0  # S[0, 2] = 0.4 vs S[1, 3] = 0.3


def test_greedy_can_keep_the_last_blocks_out_of_every_merge():
    s = torch.tensor([[1.0, 0.2, 0.1, 0.1],
                      [0.2, 1.0, 0.5, 0.3],
                      [0.1, 0.5, 1.0, 0.9],
                      [0.1, 0.3, 0.9, 1.0]])
    groups = [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert GreedySimilarity(keep_last=0).next_merge(s, groups) == 2  # S[2, 3] = 0.9: the last block
    assert GreedySimilarity(keep_last=1).next_merge(s, groups) == 1  # S[1, 2] = 0.5: the last block kept
    assert GreedySimilarity().keep_last == 0  # the paper merges any pair
    assert GreedySimilarity(keep_last=2).next_merge(s, groups) == 0
    assert GreedySimilarity(keep_last=3).next_merge(s, groups) == 2  # nothing else left: the best pair
    with pytest.raises(ValueError, match="keep_last must be an int >= 0, got -1"):
        get_policy("greedy", keep_last=-1)


def test_fixed_spans_are_validated():
    assert FixedSpans([(4, 6), (1, 2)]).spans == [(1, 2), (4, 6)] and FixedSpans([(4, 6), (1, 2)]).removes == 3
    with pytest.raises(ValueError, match="overlap"):
        FixedSpans([(1, 3), (3, 4)])
    with pytest.raises(ValueError, match="first < last"):
        FixedSpans([(2, 2)])
    with pytest.raises(TypeError, match="pairs of block indices"):
        FixedSpans([1, 2])


def test_registries_hold_the_documented_names():
    assert {"flattengpt", "flattengpt+o", "flattengpt+o+seq", "reconstruction", "magnitude", "activation",
            "random"} <= set(SCORERS.names())
    assert set(POLICIES.names()) >= {"greedy", "greedy-recompute", "fixed"}
    assert set(SIMILARITIES.names()) >= {"cosine", "angular"}
    with pytest.raises(ValueError, match="unknown scorer 'nope'; known: activation, flattengpt"):
        get_scorer("nope")
    with pytest.raises(ValueError, match="target must be 'wide' or 'sequential'"):
        get_scorer("flattengpt", target="output")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 20), d=st.integers(1, 40), rows=st.integers(1, 16), fill_rows=st.integers(1, 16),
       seed=st.integers(0, 1000))
def test_the_gram_matrix_built_from_its_upper_triangle_is_the_full_product(n, d, rows, fill_rows, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    gram = torch.zeros(d, d, dtype=torch.float64)
    add_upper_gram(gram, x, rows=rows)
    add_upper_gram(gram, 2 * x, rows=rows)
    full = symmetric(gram, rows=fill_rows)
    assert full is gram  # filled in place
    torch.testing.assert_close(full, 5 * x.double().T @ x.double(), rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(spec=tiny_specs(dtypes=(torch.float64,)), seed=st.integers(0, 100), scale=st.floats(0.01, 100))
def test_token_weights_weigh_each_token_in_the_statistics(spec, seed, scale):
    """Weights ``w`` per token make the Gram matrices and the cross term sums of ``w_t`` times each token's
    term: a constant weight scales them; zero weights on a batch leave the statistics of the others."""
    model = tiny_model(spec)
    arch = architecture_for(model)
    wide = BlockPair(model, 0).flatten()
    shape = arch.block_shape(wide, model.config)
    ids = torch.randint(0, 61, (4, 6), generator=torch.Generator().manual_seed(seed))
    inputs = capture(model, arch, list(ids.split(2)))
    hidden, calls = inputs.hidden, inputs.calls[0]
    half = select_block(wide, arch, model.config, 0, range(spec.num_kv_heads), range(shape.intermediate_size))
    targets = [torch.randn_like(h) for h in hidden]

    def stats(weights, batches=slice(None)):
        chosen = [hidden[batches], calls[batches], targets[batches], None if weights is None else weights[batches]]
        a = attention_stats(wide, arch, shape, chosen[0], chosen[1], chosen[3])
        m = mlp_stats(half, arch, shape, chosen[0], chosen[1], chosen[2], chosen[3])
        return a.gram, m.gram, m.target_cross

    def close(a, b):  # the statistics multiply float32 activations
        assert (a - b).norm() <= 1e-5 * b.norm()

    for weighted, unweighted in zip(stats([torch.full((12,), scale), torch.full((12,), scale)]), stats(None)):
        close(weighted, scale * unweighted)
    for weighted, first in zip(stats([torch.ones(12), torch.zeros(12)]), stats(None, slice(0, 1))):
        close(weighted, first)
