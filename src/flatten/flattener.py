"""``Flattener``: FlattenGPT end to end: choose spans, flatten, score, prune, compensate, in sequence."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flatten.architectures import architecture_for
from flatten.calibration import LayerInputs, attention_stats, capture, input_similarity, mlp_stats, on_device, run_block
from flatten.criteria.policies import SIMILARITIES, FixedSpans, PairPolicy, Span, get_policy
from flatten.criteria.scorers import ChannelScorer, get_scorer
from flatten.merge import select_block
from flatten.models import count_parameters
from flatten.pair import BlockPair
from flatten.plan import Merge, Plan, model_signature


class Flattener:
    """Compresses ``model`` (in place) on ``calibration`` token ids (samples x sequence length).

        flattener = Flattener(model, calibration, scorer="reconstruction", policy="greedy")
        model, plan = flattener.compress(remove=6)      # or ratio=0.2: fraction of parameters
        plan.save("plan.json")

    ``scorer`` and ``policy`` are registered names or instances (the default scorer, ``reconstruction``, is
    the paper's recipe with our additions, the best measured in ``benchmarks/RESULTS.md``; ``flattengpt`` is
    the paper's own); ``similarity`` names a measure of
    ``flatten.criteria.SIMILARITIES``. Every decision for a block is made on the activations that reach it
    in the already-compressed model below it (sequential calibration). ``device`` is where blocks are
    computed (default: where the model is); the model may stay elsewhere, e.g. on the CPU, and only the
    block in hand and one block boundary's activations visit the device.
    """

    def __init__(self, model: nn.Module, calibration: Tensor, scorer: str | ChannelScorer = "reconstruction",
                 policy: str | PairPolicy = "greedy", similarity: str = "cosine", batch_size: int = 4,
                 device: str | torch.device | None = None, progress: bool = True):
        self.model = model
        self.arch = architecture_for(model)
        if not isinstance(calibration, Tensor) or calibration.dim() != 2 or calibration.dtype not in (torch.long, torch.int):
            raise TypeError("calibration must be a 2-D integer tensor of token ids (samples x sequence length)")
        if calibration.shape[0] < 1 or calibration.shape[1] < 2:
            raise ValueError(f"calibration of shape {tuple(calibration.shape)} is empty or too short")
        vocab = model.get_input_embeddings().num_embeddings
        if int(calibration.min()) < 0 or int(calibration.max()) >= vocab:
            raise ValueError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary); got ids "
                             f"from {int(calibration.min())} to {int(calibration.max())}: another tokenizer?")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.calibration = calibration
        self.batches = list(calibration.split(batch_size))
        self.scorer = get_scorer(scorer)
        self.policy = get_policy(policy)
        self.similarity_name = similarity
        self.measure = SIMILARITIES.get(similarity)
        self.progress = progress
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    def blocks_for_ratio(self, ratio: float) -> int:
        """Blocks to remove so that about ``ratio`` of all parameters (embeddings included) go."""
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ValueError(f"ratio must be a fraction of the parameters in (0, 1), got {ratio!r}")
        per_block = sum(p.numel() for p in self.arch.layers_of(self.model)[0].parameters())
        return max(1, round(ratio * count_parameters(self.model) / per_block))

    def _removals(self, remove: int | None, ratio: float | None) -> int:
        if (remove is None) == (ratio is None):
            if isinstance(self.policy, FixedSpans) and remove is None and ratio is None:
                return self.policy.removes
            raise ValueError("give exactly one of remove (blocks) or ratio (fraction of parameters)")
        count = len(self.arch.layers_of(self.model))
        k = self.blocks_for_ratio(ratio) if ratio is not None else remove
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= count - 1:
            raise ValueError(f"cannot remove {k!r} of {count} blocks: remove must be an int from 1 to {count - 1}")
        if isinstance(self.policy, FixedSpans) and k != self.policy.removes:
            raise ValueError(f"the fixed spans {self.policy.spans} remove {self.policy.removes} blocks, not {k}")
        return k

    def similarity_matrix(self) -> Tensor:
        """Block-input similarity of the model as it is now (L x L)."""
        inputs = self._capture()
        return input_similarity(list(self.arch.layers_of(self.model)), inputs.hidden, inputs.calls, self.measure,
                                self.device)

    def _capture(self) -> LayerInputs:
        return capture(self.model, self.arch, self.batches).to(self.device)

    def _run(self, block: nn.Module, hidden: list[Tensor], calls: list, name: str) -> list[Tensor]:
        with on_device(block, self.device):
            return run_block(block, hidden, calls, name=name)

    def plan_spans(self, remove: int | None = None, ratio: float | None = None) -> tuple[list[Span], Tensor]:
        """Dry run of a one-shot policy: the spans it would flatten, and the similarity matrix."""
        k = self._removals(remove, ratio)
        similarity = self.similarity_matrix()
        return self._greedy_groups(similarity, k), similarity

    def _greedy_groups(self, similarity: Tensor, k: int) -> list[Span]:
        groups = [(i, i) for i in range(similarity.shape[0])]
        for _ in range(k):
            g = self.policy.next_merge(similarity, groups)
            groups[g : g + 2] = [(groups[g][0], groups[g + 1][1])]
        return groups

    def compress(self, remove: int | None = None, ratio: float | None = None) -> tuple[nn.Module, Plan]:
        """Remove blocks by flattening; return the (same, now smaller) model and the plan."""
        k = self._removals(remove, ratio)
        start = time.perf_counter()
        plan = Plan(model_signature(self.model), self._method())
        if self.policy.recompute:
            self._compress_recomputing(k, plan)
        else:
            self._compress_one_shot(k, plan)
        plan.method["seconds"] = round(time.perf_counter() - start, 2)
        plan.method["parameters_after"] = count_parameters(self.model)
        return self.model, plan

    def _method(self) -> dict:
        return {"scorer": repr(self.scorer), "policy": repr(self.policy), "similarity": self.similarity_name,
                "calibration": {"samples": self.calibration.shape[0], "seq_len": self.calibration.shape[1]},
                "parameters_before": count_parameters(self.model)}

    def _compress_one_shot(self, k: int, plan: Plan) -> None:
        inputs = self._capture()
        layers = self.arch.layers_of(self.model)
        similarity = input_similarity(list(layers), inputs.hidden, inputs.calls, self.measure, self.device)
        plan.similarity = similarity.tolist()
        groups = self._greedy_groups(similarity, k)
        last = max(a for a, c in groups if c > a)
        hidden, position = inputs.hidden, 0
        for a, c in tqdm(groups, desc="flattening", unit="block", disable=not self.progress):
            calls = inputs.calls[a]
            for j in range(a + 1, c + 1):
                plan.merges.append(self._merge(position, (a, j), float(similarity[a, j]), hidden, calls))
            if a == last:
                break
            hidden = self._run(layers[position], hidden, calls, name=f"block {position} (original {a})")
            position += 1

    def _compress_recomputing(self, k: int, plan: Plan) -> None:
        spans = [(i, i) for i in range(len(self.arch.layers_of(self.model)))]
        for _ in tqdm(range(k), desc="flattening", unit="merge", disable=not self.progress):
            inputs = self._capture()
            layers = self.arch.layers_of(self.model)
            similarity = input_similarity(list(layers), inputs.hidden, inputs.calls, self.measure, self.device)
            if plan.similarity is None:
                plan.similarity = similarity.tolist()
            b = self.policy.next_merge(similarity, [(i, i) for i in range(len(layers))])
            hidden = inputs.hidden
            for i in range(b):
                hidden = self._run(layers[i], hidden, inputs.calls[i], name=f"block {i}")
            span = (spans[b][0], spans[b + 1][1])
            plan.merges.append(self._merge(b, span, float(similarity[b, b + 1]), hidden, inputs.calls[b]))
            spans[b : b + 2] = [span]

    def _merge(self, position: int, span: Span, similarity: float, hidden: list[Tensor], calls: list) -> Merge:
        """Flatten blocks ``position`` and ``position + 1``, choose what to keep on ``hidden`` (their input
        in the compressed model), prune, compensate, and put the result in the model."""
        arch, config = self.arch, self.model.config
        want = arch.shape_of(config)
        pair = BlockPair(self.model, position)
        home = next(pair.first.parameters()).device
        wide = pair.flatten().to(self.device)
        shape = arch.block_shape(wide, config)

        attention = attention_stats(wide, arch, shape, hidden, calls)
        groups = self.scorer.select_groups(attention, want.num_kv_heads)
        del attention
        half = select_block(wide, arch, config, position, groups.keep, range(shape.intermediate_size), o_proj=groups.weight)
        targets = None
        if self.scorer.needs_target:
            targets = self._run(pair.second, self._run(pair.first, hidden, calls, "first block"), calls, "second block")
        mlp = mlp_stats(half, arch, shape, hidden, calls, targets)
        channels = self.scorer.select_channels(mlp, want.intermediate_size)
        del mlp, half, targets
        merge = Merge(position, span, similarity, groups.keep.tolist(), channels.keep.tolist(),
                      None if groups.weight is None else groups.weight.to(home),
                      None if channels.weight is None else channels.weight.to(home))
        pair.replace(pair.prune(wide, merge.keep_groups, merge.keep_channels, merge.o_proj, merge.down_proj).to(home))
        return merge
