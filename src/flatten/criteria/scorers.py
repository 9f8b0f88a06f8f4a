"""Channel scorers: calibration statistics of one wide block -> which KV groups and MLP channels to keep.

A scorer sees the wide block in two steps: first the attention (``AttentionStats``),
then the MLP, whose statistics are gathered with the attention already pruned (``MlpStats``). For each it
returns a ``Choice``: the kept indices and, if it compensates, a replacement ``o_proj``/``down_proj`` weight.
A new metric only overrides ``score_groups`` and/or ``score_channels`` (higher = keep).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from flatten.criteria.statistics import AttentionStats, MlpStats
from flatten.registry import Registry


@dataclass
class Choice:
    keep: Tensor  # sorted indices
    weight: Tensor | None = None  # replacement o_proj / down_proj weight for the kept indices, or None


def top(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` highest scores, sorted ascending (ties: lower index first)."""
    if scores.dim() != 1 or keep > scores.numel():
        raise ValueError(f"cannot keep {keep} of scores shaped {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores hold non-finite values")
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


def _everything(keep: Tensor, n: int) -> bool:
    """Whether ``keep`` is every one of ``n`` inputs in order (a wide block refitted whole): then the Gram
    matrix is used as it is, not copied (29,184 MLP channels: 6.8 GB in float64)."""
    return torch.equal(keep.cpu(), torch.arange(n))


def cholesky_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    """``(L L^T)^-1 rhs`` for a lower-triangular ``factor`` ``L``, by two triangular solves. Unlike
    ``torch.cholesky_solve``, which copies the factor (a third 6.8 GB matrix beside the Gram matrix and its
    factor at 29,184 MLP channels), it solves against the factor and its transposed view as they are."""
    return torch.linalg.solve_triangular(factor.mT, torch.linalg.solve_triangular(factor, rhs, upper=False),
                                         upper=True)


def ridge_refit(gram: Tensor, cross: Tensor, keep: Tensor, weight: Tensor, ridge: float) -> Tensor:
    """Ridge least squares for the kept inputs of a writer: ``W'^T = (G_SS + lam I)^-1 (X_S + lam W_S^T)``.

    ``gram`` is ``A^T A`` of the inputs, ``cross`` is ``A^T Y`` for the wanted output ``Y``, ``weight`` the
    current writer weight (out x in); ``lam = ridge * mean eigenvalue of gram``. Returns out x |keep|.
    """
    lam = ridge * gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    rhs = cross[keep] + lam * weight.double()[:, keep].T
    g = gram if _everything(keep, gram.shape[0]) else gram[keep][:, keep]
    diagonal = g.diagonal().clone()
    g.diagonal().add_(lam)
    try:
        factor, info = torch.linalg.cholesky_ex(g)  # positive definite unless rounding made it indefinite
        solved = cholesky_solve(factor, rhs) if int(info) == 0 else torch.linalg.solve(g, rhs)
    finally:
        g.diagonal().copy_(diagonal)
    return solved.T.to(weight.dtype)


def refit_residual(stats: MlpStats, keep: Tensor, weight: Tensor | None) -> float:
    """``sum_t ||psi_S,t W^T - (y_true,t - u'_t)||^2``: what a block whose MLP keeps channels ``keep`` with
    ``down_proj`` weight ``weight`` (out x |keep|; None: the wide block's own columns) misses of its target on
    the calibration tokens, from ``stats`` gathered with a target (``target_cross``, ``target_energy``). It is
    the squared distance of the block's output from the target, the objective the refits minimise."""
    if stats.target_cross is None or stats.target_energy is None:
        raise ValueError("the residual needs MLP statistics gathered with a target")
    w = (stats.weights["down"][:, keep] if weight is None else weight).double().T  # |keep| x out
    g = stats.gram if _everything(keep, stats.gram.shape[0]) else stats.gram[keep][:, keep]
    return stats.target_energy - 2 * float((w * stats.target_cross[keep]).sum()) + float((w * (g @ w)).sum())


def ridge_leverage(gram: Tensor, ridge: float, block: int = 1024) -> Tensor:
    """``diag(C (C + lam I)^-1) = 1 - lam diag((C + lam I)^-1)``, ``lam = ridge * mean eigenvalue``.

    With ``C + lam I = L L^T``, ``diag((C + lam I)^-1)`` holds the squared column norms of ``L^-1``, found
    ``block`` columns at a time (column ``i`` of ``L^-1`` is zero above row ``i``). Memory besides ``gram``:
    the factor and a few ``block``-wide columns. ``gram`` is shifted in place for the factorisation and
    restored exactly (factorising a shifted copy in place made the solver copy it again), and the columns are
    solved against the whole factor, not its trailing square, which the solver would copy (only the last
    quarter is solved on its own square, a copy of at most 1/16 of the factor)."""
    lam = ridge * gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    diagonal = gram.diagonal().clone()
    gram.diagonal().add_(lam)
    try:
        factor = torch.linalg.cholesky(gram)
    finally:
        gram.diagonal().copy_(diagonal)
    n = gram.shape[0]
    inverse_diagonal = torch.empty(n, dtype=gram.dtype, device=gram.device)
    for a in range(0, n, block):
        b = min(block, n - a)
        start = a if 4 * (n - a) <= n else 0
        unit = torch.zeros(n - start, b, dtype=gram.dtype, device=gram.device)
        unit[a - start : a - start + b].fill_diagonal_(1)
        columns = torch.linalg.solve_triangular(factor[start:, start:], unit, upper=False)
        inverse_diagonal[a : a + b] = columns.square().sum(0)
    return 1 - lam * inverse_diagonal


class ChannelScorer:
    """Keeps the top-scoring KV groups and MLP channels; no compensation.

    Subclass and override ``score_groups`` (from ``AttentionStats``, one score per KV group) and/or
    ``score_channels`` (from ``MlpStats``, one per channel); override ``compensate_groups`` /
    ``compensate_channels`` to return a replacement ``o_proj`` / ``down_proj`` weight for kept indices (they
    are also used where the selection is forced: a merge that keeps one block of the pair whole), or
    ``select_*`` to choose and compensate in one. Set ``needs_target = True`` to receive
    ``MlpStats.target_cross``.
    """

    needs_target: bool = False

    def score_groups(self, stats: AttentionStats) -> Tensor:
        per_head = stats.contribution
        return per_head.view(stats.shape.num_kv_heads, stats.shape.group_size).sum(1)

    def score_channels(self, stats: MlpStats) -> Tensor:
        return stats.gram.diagonal()

    def compensate_groups(self, stats: AttentionStats, keep: Tensor) -> Tensor | None:
        return None

    def compensate_channels(self, stats: MlpStats, keep: Tensor) -> Tensor | None:
        return None

    def select_groups(self, stats: AttentionStats, keep: int) -> Choice:
        kept = top(self.score_groups(stats), keep)
        return Choice(kept, self.compensate_groups(stats, kept))

    def select_channels(self, stats: MlpStats, keep: int) -> Choice:
        kept = top(self.score_channels(stats), keep)
        return Choice(kept, self.compensate_channels(stats, kept))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class FlattenGPTScorer(ChannelScorer):
    """The paper's recipe and the registered extensions of it.

    - ``heads``: ``"contribution"`` (paper: KV groups by the summed mean contribution norm of their heads) or
      ``"reconstruction"`` (greedily drop the group whose removal least changes the attention output).
    - ``refit_o``: refit the kept heads' ``o_proj`` by ridge least squares to the wide attention's output.
    - ``target``: what the ``down_proj`` refit fits: ``"wide"`` (paper: the wide MLP's own output) or
      ``"sequential"`` (what the original blocks computed one after the other, minus the pruned ``u'``).
    - ``ridge``: lambda for leverage and ``down_proj`` refit, in units of the mean eigenvalue (paper: 10).
    - ``o_ridge``: the same for the ``o_proj`` refit.
    """

    def __init__(self, heads: str = "contribution", refit_o: bool = False, target: str = "wide",
                 ridge: float = 10.0, o_ridge: float = 0.01):
        if heads not in ("contribution", "reconstruction"):
            raise ValueError(f"heads must be 'contribution' or 'reconstruction', got {heads!r}")
        if target not in ("wide", "sequential"):
            raise ValueError(f"target must be 'wide' or 'sequential', got {target!r}")
        for name, value in (("ridge", ridge), ("o_ridge", o_ridge)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.heads, self.refit_o, self.target, self.ridge, self.o_ridge = heads, refit_o, target, float(ridge), float(o_ridge)
        self.needs_target = target == "sequential"

    def refit_o_proj(self, stats: AttentionStats, keep: Tensor) -> Tensor:
        """The ridge refit of ``o_proj`` for the KV groups ``keep`` (sorted) to the wide attention's output."""
        rows = torch.cat([stats.group_rows(int(g)) for g in keep])
        cross = stats.gram @ stats.weights["o"].double().T
        return ridge_refit(stats.gram, cross, rows, stats.weights["o"], self.o_ridge)

    def attention_errors(self, stats: AttentionStats, candidates: list[list[int]]) -> list[float]:
        """Squared error of the attention output (summed over tokens) when only the groups of a candidate
        remain (with the ``o_proj`` refit if ``refit_o``), for each candidate."""
        w = stats.weights["o"].double()
        if self.refit_o:
            total = float(torch.einsum("oi,ij,oj->", w, stats.gram, w))
            cross_all = stats.gram @ w.T
            lam = self.o_ridge * stats.gram.diagonal().mean()
        errors = []
        for keep in candidates:
            rows = torch.cat([stats.group_rows(g) for g in keep])
            if not self.refit_o:
                dropped = torch.tensor(sorted(set(range(w.shape[1])) - set(rows.tolist())), dtype=torch.long)
                errors.append(float(torch.einsum("oi,ij,oj->", w[:, dropped], stats.gram[dropped][:, dropped],
                                                 w[:, dropped])))
                continue
            cross = cross_all[rows]
            g = stats.gram[rows][:, rows] + lam * torch.eye(len(rows), dtype=torch.float64, device=stats.gram.device)
            errors.append(total - float((cross * torch.linalg.solve(g, cross)).sum()))
        return errors

    def select_groups(self, stats: AttentionStats, keep: int) -> Choice:
        if self.heads == "contribution":
            return super().select_groups(stats, keep)
        kept_list = list(range(stats.shape.num_kv_heads))
        while len(kept_list) > keep:
            errors = self.attention_errors(stats, [[g for g in kept_list if g != drop] for drop in kept_list])
            kept_list.pop(min(range(len(errors)), key=errors.__getitem__))
        kept = torch.tensor(kept_list, dtype=torch.long)
        return Choice(kept, self.compensate_groups(stats, kept))

    def compensate_groups(self, stats: AttentionStats, keep: Tensor) -> Tensor | None:
        return self.refit_o_proj(stats, keep) if self.refit_o else None

    def score_channels(self, stats: MlpStats) -> Tensor:
        return ridge_leverage(stats.gram, self.ridge)

    def compensate_channels(self, stats: MlpStats, keep: Tensor) -> Tensor | None:
        cross = stats.target_cross if self.target == "sequential" else stats.own_cross()
        return ridge_refit(stats.gram, cross, keep, stats.weights["down"], self.ridge)


class MagnitudeScorer(ChannelScorer):
    """Data-free: groups by ``||W_v,g|| * ||W_o,g||``, channels by ``||W_up,i|| * ||W_down,:i||``."""

    def score_groups(self, stats: AttentionStats) -> Tensor:
        hd = stats.shape.head_dim
        v = stats.weights["v"].double().view(stats.shape.num_kv_heads, hd, -1).flatten(1).norm(dim=1)
        o = torch.stack([stats.weights["o"].double()[:, stats.group_rows(g)].norm()
                         for g in range(stats.shape.num_kv_heads)])
        return v * o

    def score_channels(self, stats: MlpStats) -> Tensor:
        return stats.weights["up"].double().norm(dim=1) * stats.weights["down"].double().norm(dim=0)


class ActivationScorer(ChannelScorer):
    """Groups by the RMS of their heads' outputs, channels by the RMS of their activation ``psi``."""

    def score_groups(self, stats: AttentionStats) -> Tensor:
        per_row = stats.gram.diagonal()
        return torch.stack([per_row[stats.group_rows(g)].sum() for g in range(stats.shape.num_kv_heads)]).sqrt()

    def score_channels(self, stats: MlpStats) -> Tensor:
        return stats.gram.diagonal().sqrt()


class RandomScorer(ChannelScorer):
    """Uniformly random groups and channels, reproducible from ``seed``."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def __repr__(self) -> str:
        return f"RandomScorer(seed={self.seed})"

    def score_groups(self, stats: AttentionStats) -> Tensor:
        return torch.rand(stats.shape.num_kv_heads, generator=self._generator, dtype=torch.float64)

    def score_channels(self, stats: MlpStats) -> Tensor:
        return torch.rand(stats.shape.intermediate_size, generator=self._generator, dtype=torch.float64)


SCORERS: Registry[Callable[..., ChannelScorer]] = Registry("scorer")


def register_scorer(name: str, factory: Callable[..., ChannelScorer] | None = None, *, replace: bool = False):
    """Register a scorer class or factory under ``name``; usable as a class decorator."""
    return SCORERS.register_factory(name, factory, replace=replace)


def get_scorer(scorer: str | ChannelScorer, **options) -> ChannelScorer:
    """A scorer instance from a registered name (with options) or an instance (returned as is)."""
    return SCORERS.build(scorer, ChannelScorer, **options)


def _variant(**fixed):
    return functools.partial(FlattenGPTScorer, **fixed)


register_scorer("flattengpt", _variant())
register_scorer("flattengpt+o", _variant(refit_o=True))
register_scorer("flattengpt+o+seq", _variant(refit_o=True, target="sequential"))
register_scorer("reconstruction", _variant(heads="reconstruction", refit_o=True, target="sequential", ridge=1.0))
register_scorer("magnitude", MagnitudeScorer)
register_scorer("activation", ActivationScorer)
register_scorer("random", RandomScorer)
