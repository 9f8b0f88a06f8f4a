"""Importance metrics (channel scorers) and pair-selection policies, each in a registry keyed by name."""

from flatten.criteria.policies import (
    POLICIES,
    SIMILARITIES,
    FixedSpans,
    GreedySimilarity,
    PairPolicy,
    get_policy,
)
from flatten.criteria.scorers import (
    SCORERS,
    ActivationScorer,
    AttentionStats,
    ChannelScorer,
    Choice,
    FlattenGPTScorer,
    MagnitudeScorer,
    MlpStats,
    RandomScorer,
    get_scorer,
    register_scorer,
    ridge_leverage,
    ridge_refit,
    top,
)

__all__ = [
    "POLICIES",
    "SCORERS",
    "SIMILARITIES",
    "ActivationScorer",
    "AttentionStats",
    "ChannelScorer",
    "Choice",
    "FixedSpans",
    "FlattenGPTScorer",
    "GreedySimilarity",
    "MagnitudeScorer",
    "MlpStats",
    "PairPolicy",
    "RandomScorer",
    "get_policy",
    "get_scorer",
    "register_scorer",
    "ridge_leverage",
    "ridge_refit",
    "top",
]
