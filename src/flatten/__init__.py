"""flatten: depth compression of decoder-only language models with FlattenGPT (Xu et al., 2026).

Two adjacent blocks become one block of double width (heads and MLP channels side by side), which is then
pruned back to the original width: the model loses a layer and stays a stock checkpoint of its family.
"""

import flatten.strategies.baselines  # noqa: F401  (registers the baseline strategies)
from flatten.criteria import ChannelScorer, PairPolicy, get_policy, get_scorer, register_policy, register_scorer
from flatten.data import calibration_tokens
from flatten.evaluation.latency import Latency, measure_latency
from flatten.evaluation.perplexity import Perplexity, perplexity
from flatten.flattener import Flattener
from flatten.merge import flatten_blocks, flatten_run, fold_norms, prune_block, replace_span
from flatten.models.architectures import (ARCHITECTURES, NORMS, Architecture, BlockShape, architecture_for,
                                          register_architecture)
from flatten.models.checkpoint import check_stock, save_checkpoint
from flatten.models.loading import count_parameters, embedded_model_path, load_model
from flatten.models.record import RunRecord
from flatten.pair import BlockPair, BlockRun
from flatten.plan import Merge, Plan
from flatten.recipe import merge_pair
from flatten.run.recovery import Recovery, recover
from flatten.strategies.compressor import STRATEGIES, Compressor, get_strategy, register_strategy
from flatten.strategies.options import Method, build_strategy
from flatten.verify import verify_architecture

__all__ = [
    "ARCHITECTURES",
    "NORMS",
    "STRATEGIES",
    "Architecture",
    "BlockPair",
    "BlockRun",
    "BlockShape",
    "ChannelScorer",
    "Compressor",
    "Flattener",
    "Latency",
    "Merge",
    "Method",
    "PairPolicy",
    "Plan",
    "Perplexity",
    "Recovery",
    "RunRecord",
    "architecture_for",
    "build_strategy",
    "calibration_tokens",
    "check_stock",
    "count_parameters",
    "embedded_model_path",
    "flatten_blocks",
    "flatten_run",
    "get_policy",
    "get_scorer",
    "get_strategy",
    "recover",
    "fold_norms",
    "load_model",
    "measure_latency",
    "merge_pair",
    "perplexity",
    "prune_block",
    "register_architecture",
    "register_policy",
    "register_scorer",
    "register_strategy",
    "replace_span",
    "save_checkpoint",
    "verify_architecture",
]
