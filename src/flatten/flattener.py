"""``Flattener``: FlattenGPT end to end: choose spans, flatten, score, prune, compensate, in sequence."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flatten.calibration import input_similarity
from flatten.checks import check_choice
from flatten.criteria.policies import SIMILARITIES, FixedSpans, LossSearch, PairPolicy, Span, get_policy
from flatten.criteria.scorers import ChannelScorer, get_scorer
from flatten.data import token_sha256
from flatten.engine.activations import Activations
from flatten.engine.executor import Executor, MergeOptions
from flatten.engine.search import Search
from flatten.evaluation.measure import Stopwatch
from flatten.models.loading import count_parameters
from flatten.pair import BlockPair
from flatten.plan import Plan, model_signature
from flatten.recipe import SELECTIONS
from flatten.strategies.compressor import Compressor, register_strategy

TOKEN_WEIGHTINGS = ("none", "input-rms")
FALLBACKS = (False, True, "reconstruction", "loss")
FIT_TARGETS = ("pair", "dense")


@register_strategy("cut-absorb")
class Flattener(Compressor):
    """Compresses ``model`` (in place) on ``calibration`` token ids (samples x sequence length).

        flattener = Flattener(model, calibration)       # the default recipe, cut-absorb
        model, plan = flattener.compress(remove=6)      # or ratio=0.2: fraction of parameters
        plan.save("plan.json")

    The engine of every recipe that merges, absorbs or drops blocks; its defaults are the library's default
    recipe, registered as ``cut-absorb`` (kept on the validation texts, ``benchmarks/RESULTS.md``), and the
    other named recipes (``flattengpt``, the paper's; ``cut-merge``; ``cut-flatten``) are it with other
    defaults. ``scorer`` and ``policy`` are registered names or instances. The policy plans the steps, each
    removing one block: a merge (flatten two blocks, prune back; a merge of ``n`` blocks at once removes
    ``n - 1``), an absorb (a block's ``down_proj`` refitted to also compute the next block) or a drop. The
    default, ``cut``, absorbs each block of the contiguous run whose input and output are closest into the
    block before the run (``cut-merge`` merges them instead, one at a time; ``cut-flatten`` flattens the run
    and the block before it into one wide block and prunes it back once); ``greedy`` is the paper's plan
    (merge the pairs of most similar inputs). The scorer chooses what a merge keeps and
    compensates merges and absorbs (the default, ``reconstruction``, is the paper's recipe with our
    additions; ``flattengpt`` is the paper's own); ``select="objective"`` lets the scorer's rankings propose
    candidates and keeps the one whose block misses its target least, each block kept whole among them
    (``flatten.recipe.merge_by_objective``); ``select="held-out"`` judges them on calibration batches they
    were not refitted on. ``similarity`` names a measure of
    ``flatten.criteria.SIMILARITIES`` (for the similarity policies). Every decision for a block is made on the
    activations that reach it in the already-compressed model below it (sequential calibration). ``device``
    is where blocks are computed (default: where the model is); the model may stay elsewhere, e.g. on the CPU, and only the
    block in hand and one block boundary's activations visit the device. ``prune=False`` is an ablation:
    the flattened blocks keep their width (no parameters saved; not a stock checkpoint, so it cannot be
    saved; each step flattens blocks of the model's own width). ``prune="refit"`` keeps them wide too, with
    ``down_proj`` refitted to the target as a pruned merge's is; ``prune="attention"`` / ``"mlp"`` prune only
    that half of each wide block and leave the other wide: ablations that tell where a merge loses, to the
    flattening or to the pruning (not saveable either).

    ``one_block_fallback``: after pruning a flattened pair, compare it with the two selections that keep one
    block whole and drop the other (the first block's KV groups and channels, or the second's), and keep the
    best of the three. ``True`` or ``"reconstruction"`` judges them locally, by how much of the pair's change
    to its input (the two original blocks' output minus their input) each fails to reproduce on the
    calibration data; ``"loss"`` by the model's loss on the first calibration batch with the candidate in
    place of the pair and the blocks above it as they are (three forward passes of that batch from the pair
    up, per merge, where the model is). Off by default (``benchmarks/RESULTS.md``). Each choice is in
    ``plan.method["merge_choices"]``.

    ``token_weighting``: how much each calibration token's error counts in the statistics that select and
    refit (``"none"``: all alike, the paper's least squares; ``"input-rms"``: divided by the mean square of
    the pair's input at that token, the scale the next block's RMSNorm divides out). With massive
    activations (the first token of a sequence holds most of the residual stream's squared norm in the middle
    blocks of Qwen2.5 and SmolLM2) plain least squares mostly fit that token; weighting changed Qwen2.5's
    result little (``benchmarks/RESULTS.md``), so it is off by default.

    ``fit_to``: what a scorer with a target (the default's ``down_proj`` refit) fits the new block's output
    to. ``"dense"`` (the default): the original model's activations at that depth (the pair's output in the
    uncompressed model on the same tokens), so that each step also corrects what the steps below it changed
    (a chain of absorbs then fits the whole run, as ReplaceMe's single map does); the original blocks run
    alongside, and the blocks a compression replaces stay in memory until it ends. ``"pair"``: the two
    blocks applied to the block's input in the compressed model (what the pair would compute there).

    ``checkpoint``: a plan file where the progress is saved after every step. If it exists, ``compress``
    resumes from it: the merges it holds are replayed (not recomputed) and the compression goes on after
    them, to the same weights as a run that was never interrupted. It must come from the same model,
    calibration data, options and number of blocks to remove, or it is refused.
    """

    name = "cut-absorb"
    title = ("cut-absorb: the contiguous run of blocks of least angular distance, each block absorbed into the "
             "block before the run (down_proj refitted by least squares to the dense model)")

    def __init__(self, model: nn.Module, calibration: Tensor,
                 scorer: Annotated[str | ChannelScorer, "what a merge keeps and how it is refitted"] = "reconstruction",
                 policy: Annotated[str | PairPolicy, "which steps remove the blocks: merges, absorbs, drops"] = "cut",
                 similarity: Annotated[str, "block-input similarity of the similarity policies"] = "cosine",
                 batch_size: int = 4, device: str | torch.device | None = None, progress: bool = True,
                 prune: Annotated[bool | str, "ablation: false keeps flattened blocks wide; refit keeps them "
                                  "wide and refits down_proj; attention or mlp prunes only that half"] = True,
                 checkpoint: Annotated[str | Path | None, "plan file saved after every step; resumed from if it "
                                       "exists"] = None,
                 one_block_fallback: Annotated[bool | str, "keep one block of a pair whole where that does better: "
                                               "reconstruction or loss"] = False,
                 token_weighting: Annotated[str, "none or input-rms: how each token's error counts"] = "none",
                 fit_to: Annotated[str, "dense (the original model's activations) or pair: what refits fit"] = "dense",
                 select: Annotated[str, "how a pruned merge chooses: scorer (the scorer's choice, the paper), "
                                   "objective (the scorer ranks; the candidate that misses the target least, a "
                                   "whole block among them, is kept) or held-out (the same, each candidate "
                                   "refitted on half the calibration batches and judged on the other half)"] = "scorer"):
        super().__init__(model, calibration, batch_size=batch_size, device=device, progress=progress)
        if self.arch.mlp_inexact:  # every step flattens two blocks and refits down_proj: refused before any work
            raise ValueError(self.arch.refusal(f"{self.name} (its steps flatten two blocks and refit a down_proj)",
                                               self.arch.merge_refusal))
        check_choice("one_block_fallback", one_block_fallback, FALLBACKS)
        check_choice("prune", prune, (True, False, "refit", "attention", "mlp"))
        self.prune = prune if isinstance(prune, str) else bool(prune)
        self.one_block_fallback = {False: False, True: "reconstruction"}.get(one_block_fallback, one_block_fallback)
        self.token_weighting = check_choice("token_weighting", token_weighting, TOKEN_WEIGHTINGS)
        self.fit_to = check_choice("fit_to", fit_to, FIT_TARGETS)
        self.select = check_choice("select", select, SELECTIONS)
        if checkpoint is not None and self.prune is not True:
            raise ValueError(f"wide blocks (prune={self.prune!r}) cannot be replayed from a plan: no checkpoint")
        if one_block_fallback and self.prune is not True:
            raise ValueError(f"the one-block fallback compares pruned merges; it does not go with prune={self.prune!r}")
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.scorer, self.policy = get_scorer(scorer), get_policy(policy)
        if self.one_block_fallback == "loss" and isinstance(self.policy, LossSearch):
            raise ValueError(f"{self.policy!r} already chooses each merge by the loss; one_block_fallback='loss' "
                             "does not go with it")
        self.scorer_name = scorer if isinstance(scorer, str) else type(scorer).__name__
        self.policy_name = policy if isinstance(policy, str) else type(policy).__name__
        self.similarity_name = similarity
        self.measure = SIMILARITIES.get(similarity)
        self.options = MergeOptions(self.scorer, self.prune, self.select, self.token_weighting, self.fit_to,
                                    self.one_block_fallback)
        self.watch = Stopwatch()  # seconds per phase of the last compress()

    def default_removals(self) -> int | None:
        return self.policy.removes if isinstance(self.policy, FixedSpans) else None

    def blocks_to_remove(self, remove: int | None = None, ratio: float | None = None) -> int:
        k = super().blocks_to_remove(remove, ratio)
        if isinstance(self.policy, FixedSpans) and k != self.policy.removes:
            raise ValueError(f"the fixed spans {self.policy.spans} remove {self.policy.removes} blocks, not {k}")
        return k

    def similarity_matrix(self) -> Tensor:
        """Block-input similarity of the model as it is now (L x L)."""
        inputs = self.capture_inputs()
        return input_similarity(list(self.arch.layers_of(self.model)), inputs.hidden, inputs.calls, self.measure,
                                self.device, progress=self.progress)

    def plan_spans(self, remove: int | None = None, ratio: float | None = None) -> tuple[list[Span], Tensor]:
        """Dry run of a one-shot policy: the spans it would flatten, and the similarity matrix."""
        if self.policy.adaptive:
            raise ValueError(f"{self.policy!r} decides on the model as it changes: a dry run cannot show its spans")
        k = self.blocks_to_remove(remove, ratio)
        state = self._search(Plan(model_signature(self.model), {}), k, Executor(self, self.options, self.watch))
        return self.policy.groups(state, k), state.original_similarity()

    def merges_in_isolation(self, positions: Iterable[int]) -> Iterator[tuple[int, nn.Module, nn.Module]]:
        """For each ``i`` in ``positions``, in order: ``(i, wide, merged)``, the flattened block of blocks ``i``
        and ``i + 1`` of the model as it is, and the pruned merge ``compress`` would put in their place if it
        were the only merge (chosen on the model's own activations at block ``i``). The model is not changed;
        one pass of the calibration set up to the last position in all. For finding which merges cost what
        (``benchmarks/pairs.py``)."""
        wanted, count = sorted(set(positions)), len(self.arch.layers_of(self.model))
        bad = [i for i in wanted if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count - 1]
        if not wanted or bad:
            raise ValueError(f"positions must be block indices 0..{count - 2} (a pair starts there), got "
                             f"{bad or 'none'}")
        executor = Executor(self, self.options, self.watch)
        for i, hidden, calls in self.block_inputs(self.batches):
            if i in wanted:
                merged, _, _ = executor.build_block(i, (i, i + 1), hidden, calls)
                yield i, BlockPair(self.model, i).flatten(), merged
            if i == wanted[-1]:
                return

    def compress(self, remove: int | None = None, ratio: float | None = None) -> tuple[nn.Module, Plan]:
        """Remove blocks by flattening; return the (same, now smaller) model and the plan."""
        k = self.blocks_to_remove(remove, ratio)
        start, self.watch = time.perf_counter(), Stopwatch()
        plan = Plan(model_signature(self.model), {**self._method(), "remove": k})
        executor = Executor(self, self.options, self.watch)
        state = self._search(plan, k, executor)
        dense_rows = {(r.start, r.stop): r for r in (slice(0, self.calibration.shape[0]), state.fit_rows())}
        executor.activations = Activations(self.arch.layers_of(self.model), self.calibration, self.batch_size,
                                          self.capture_inputs, self.run_layer, self.watch,
                                          list(dense_rows.values()) if self.fit_to == "dense" else [])
        if self.one_block_fallback:
            executor.choices = plan.method.setdefault("merge_choices", [])
        for merge in plan.resume(self.checkpoint) if self.checkpoint is not None else []:  # replayed, not recomputed
            executor.replay(merge)
            plan.merges.append(merge)
            state.taken(merge)
        with tqdm(total=k, initial=state.removed, desc="flattening", unit="block", disable=not self.progress) as bar:
            while state.remaining:
                steps = self.policy.next_steps(state)
                if not steps or sum(step.removes for step in steps) > state.remaining:
                    raise RuntimeError(f"{self.policy!r} gave steps {', '.join(map(str, steps)) or 'none'} with "
                                       f"{state.remaining} blocks to go")
                for step in steps:
                    plan.merges.append(state.take(step))
                    self.save_progress(plan)
                    bar.update(plan.merges[-1].count - 1)
        plan.method["seconds"] = round(time.perf_counter() - start, 2)
        plan.method["seconds_by_phase"] = self.watch.rounded()
        plan.method["parameters_after"] = count_parameters(self.model)
        return self.model, plan

    def save_progress(self, plan: Plan) -> None:
        """Save ``plan`` as the checkpoint, if there is one (after every step)."""
        if self.checkpoint is not None:
            plan.save(self.checkpoint)

    def _search(self, plan: Plan, remove: int, executor: Executor) -> Search:
        return Search(self, executor, plan, remove, self.similarity_matrix,
                      getattr(self.policy, "search_samples", None), self.save_progress)

    def _method(self) -> dict:
        return {"scorer": self.scorer_name, "scorer_config": repr(self.scorer), "policy": self.policy_name,
                "policy_config": repr(self.policy), "similarity": self.similarity_name, "prune": self.prune,
                "one_block_fallback": self.one_block_fallback, "token_weighting": self.token_weighting,
                "fit_to": self.fit_to, "select": self.select,
                "calibration": {"samples": self.calibration.shape[0], "seq_len": self.calibration.shape[1],
                                "sha256": token_sha256(self.calibration)},
                "parameters_before": count_parameters(self.model)}


def _recipe(name: str, class_name: str, title: str, doc: str, **defaults) -> type[Flattener]:
    """A ``Flattener`` registered as strategy ``name`` whose options default to ``defaults``."""
    signature = inspect.signature(Flattener.__init__)
    signature = signature.replace(parameters=[p.replace(default=defaults.pop(p.name, p.default))
                                              for p in signature.parameters.values()])
    if defaults:
        raise TypeError(f"Flattener has no options {sorted(defaults)}")

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        Flattener.__init__(*bound.args, **bound.kwargs)

    __init__.__signature__ = signature
    cls = type(class_name, (Flattener,), {"__init__": __init__, "__doc__": doc, "name": name, "title": title,
                                          "__module__": __name__})
    return register_strategy(name)(cls)


FlattenGPT = _recipe(
    "flattengpt", "FlattenGPT", "FlattenGPT, the paper's recipe (Xu et al., arXiv 2602.08858): the most similar "
    "adjacent pairs flattened and pruned back by the paper's scorer",
    """The paper's recipe as published (docs/method.md maps each step to the code): merge, ``k`` times, the
    adjacent spans whose inputs are most similar (cosine, measured once on the original model; ``greedy``),
    KV groups by their heads' contribution norm, MLP channels by ridge leverage, ``down_proj`` refitted to
    the wide MLP's own output (lambda 10 x the mean eigenvalue; the ``flattengpt`` scorer).""",
    scorer="flattengpt", policy="greedy", similarity="cosine", fit_to="pair", select="scorer")
CutMerge = _recipe(
    "cut-merge", "CutMerge", "cut-merge: the contiguous run of blocks of least angular distance, each block merged "
    "with the block before it (flattened, pruned back to the candidate that misses the dense model least)",
    """The cut's run, each block merged (flattened and pruned back) with the block before it; the scorer's
    rankings propose the heads and channels kept, each block whole among the candidates, and the candidate
    whose block misses the dense model's activations least is kept (``select="objective"``).""",
    policy="cut-merge", select="objective")
CutFlatten = _recipe(
    "cut-flatten", "CutFlatten", "cut-flatten: the contiguous run of blocks of least angular distance and the block "
    "before it flattened into one wide block, pruned back once to the candidate that misses the dense model least",
    """The cut's run and the block before it, flattened into one wide block (every block's heads and MLP
    channels side by side) and pruned back once; the scorer's rankings propose the heads and channels kept,
    each block whole among the candidates (block 1 whole is ``cut-absorb``'s absorb of the whole run), and
    the candidate whose block misses the dense model's activations least is kept (``select="objective"``).""",
    policy="cut-flatten", select="objective")

