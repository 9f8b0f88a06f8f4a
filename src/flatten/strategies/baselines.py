"""Baselines on the same harness as FlattenGPT: the depth-pruning methods ShortGPT, SLEB, LaCo and
BlockPruner, and the ablation ``prune-only`` (FlattenGPT's scorer pruning every MLP's width, no flattening).

Each is a registered ``Compressor``: ``Strategy(model, calibration, ...).compress(remove=K | ratio=R)``
changes the model in place into a stock checkpoint of its family and returns ``(model, Removal)``.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from flatten.calibration import block_influence, on_device, post_norm_direction, refit_error, run_block
from flatten.checks import TOKENS, check_choice, check_int
from flatten.criteria.scorers import ChannelScorer, get_scorer
from flatten.files import write_atomically
from flatten.merge import remove_blocks, replace_span, select_block, swapped_blocks
from flatten.models.dispatch import device_of, make_resident, resident_copy, weights_of
from flatten.models.loading import count_parameters
from flatten.recipe import choose_channels
from flatten.strategies.compressor import Compressor, register_strategy
from flatten.strategies.signals import cut_distances, loss_from


@dataclass
class Removal:
    """What a baseline that deletes blocks did. Block indices are those of the original model; the baselines
    that do more than delete record it in a subclass (``Collapse``, ``SubLayerRemoval``, ``WidthPruning``)."""

    file_name: ClassVar[str] = "removal.json"  # beside a saved checkpoint

    method: dict
    removed: list[int] = field(default_factory=list)  # blocks deleted (or collapsed into a kept block)
    scores: dict = field(default_factory=dict)  # what each decision was based on

    def what(self) -> str:
        return "removed blocks " + " ".join(map(str, self.removed))

    def describe(self) -> str:
        """What was done, in a few words."""
        return f"{self.what()} ({self.method['strategy']})"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(asdict(self), indent=1) + "\n"))
        return path


@dataclass
class Collapse(Removal):
    """LaCo's: spans of blocks collapsed into their first block (``removed``: the others)."""

    collapsed: list[tuple[int, int]] = field(default_factory=list)

    def what(self) -> str:
        return "collapsed " + " ".join(f"{a}-{c}" for a, c in self.collapsed)


@dataclass
class SubLayerRemoval(Removal):
    """BlockPruner's: blocks deleted whole, and attention or MLP sub-layers silenced in the blocks kept."""

    zeroed: list[tuple[int, str]] = field(default_factory=list)  # (block, "attention" | "mlp")

    def what(self) -> str:
        return (super().what() + "; zeroed " + " ".join(f"{i}{kind[0]}" for i, kind in self.zeroed)
                + " (a: attention, m: MLP)" if self.zeroed else super().what())


@dataclass
class WidthPruning(Removal):
    """prune-only's: no block deleted; every MLP pruned from the first width to the second."""

    mlp_width: tuple[int, int] = (0, 0)

    def what(self) -> str:
        return "pruned the MLP of every block from {} to {} channels".format(*self.mlp_width)


class Baseline(Compressor):
    """Shared by the baselines: a search subset of the calibration data and the bookkeeping of indices."""

    def __init__(self, model: nn.Module, calibration: Tensor, batch_size: int = 4,
                 device: str | torch.device | None = None, progress: bool = True,
                 search_samples: Annotated[int | None, "calibration sequences a search scores on (default: all)"]
                 = None):
        super().__init__(model, calibration, batch_size=batch_size, device=device, progress=progress)
        check_int("search_samples", search_samples, 1, calibration.shape[0], optional=True)
        self.search_batches = list(calibration[:search_samples].split(batch_size))

    def record_removal(self, start: float, kind: type[Removal] = Removal, **found) -> Removal:
        """The record of a compression that began at ``start`` (``time.perf_counter()``): a ``kind`` with
        ``found`` (``removed``, ``scores``, and the kind's own fields), its method the strategy's options."""
        method = {"strategy": self.name, **self.options(),
                  "calibration": {"samples": self.calibration.shape[0], "seq_len": self.calibration.shape[1]},
                  "seconds": round(time.perf_counter() - start, 2), "parameters_after": count_parameters(self.model)}
        return kind(method, **found)

    def options(self) -> dict:
        return {"search_samples": sum(b.shape[0] for b in self.search_batches)}


@register_strategy("shortgpt")
class ShortGPT(Baseline):
    """ShortGPT (Men et al., 2024): delete the ``k`` blocks of lowest Block Influence,
    ``BI_i = 1 - E_tokens cos(x_i, y_i)`` (a block's input vs its output, token by token), measured once on
    the calibration data through the unchanged model."""

    name = "shortgpt"
    title = "ShortGPT (Men et al., 2024)"

    def __init__(self, model: nn.Module, calibration: Tensor, batch_size: int = 4,
                 device: str | torch.device | None = None, progress: bool = True):
        super().__init__(model, calibration, batch_size=batch_size, device=device, progress=progress)

    def options(self) -> dict:
        return {}

    @torch.no_grad()
    def block_influence(self) -> Tensor:
        inputs = self.capture_inputs()
        layers = self.arch.layers_of(self.model)
        influence = torch.zeros(len(layers), dtype=torch.float64)
        hidden = inputs.hidden
        for i, layer in enumerate(tqdm(layers, desc="block influence", unit="block", disable=not self.progress)):
            out = self.run_layer(layer, hidden, inputs.calls[i], name=f"block {i}")
            influence[i] = block_influence(hidden, out)
            hidden = out
        return influence

    def compress(self, remove: int | None = None, ratio: float | None = None) -> tuple[nn.Module, Removal]:
        k, start = self.blocks_to_remove(remove, ratio), time.perf_counter()
        influence = self.block_influence()
        drop = sorted(influence.argsort()[:k].tolist())
        remove_blocks(self.model, drop, self.arch)
        return self.model, self.record_removal(start, removed=drop, scores={"block_influence": influence.tolist()})


@register_strategy("sleb")
class SLEB(Baseline):
    """SLEB (Song et al., 2024): ``k`` times, delete the block whose removal raises the calibration loss
    least, measured on the model as already pruned (``search_samples`` rows of the calibration data)."""

    name = "sleb"
    title = "SLEB (Song et al., 2024)"

    def compress(self, remove: int | None = None, ratio: float | None = None) -> tuple[nn.Module, Removal]:
        k, start = self.blocks_to_remove(remove, ratio), time.perf_counter()
        original = list(range(len(self.arch.layers_of(self.model))))
        removed, losses = [], []
        for _ in tqdm(range(k), desc="SLEB", unit="block", disable=not self.progress):
            # without block i: block i's input goes straight to block i + 1
            candidates = [loss_from(self, hidden, i + 1, self.search_batches)
                          for i, hidden, _ in self.block_inputs(self.search_batches)]
            best = min(range(len(candidates)), key=candidates.__getitem__)
            removed.append(original.pop(best))
            losses.append(candidates)
            remove_blocks(self.model, [best], self.arch)
        return self.model, self.record_removal(start, removed=sorted(removed),
                                        scores={"order": removed, "candidate_losses": losses})


@register_strategy("laco")
class LaCo(Baseline):
    """LaCo, Layer Collapse (Yang et al., 2024, arXiv 2402.11187; official code: github.com/yangyifei729/LaCo).

    The walk (the paper's Algorithm 1, as its official notebooks run it): ``l`` starts at ``H - C``; at each
    ``l`` the ``C`` blocks ``l .. l+C-1`` of the model as collapsed so far (fewer where the model ends sooner)
    are merged into one block at ``l``; the merged model is kept if the cosine similarity of its last hidden
    states (the output of the final norm) to the original model's, each calibration sequence flattened to one
    vector and the cosines averaged over the sequences, is above ``T``, and the walk moves down by ``I``
    (the next collapse may take in the block just merged); otherwise it moves down by 1. It ends when
    ``l < L``. Similarity is measured on the first ``search_samples`` calibration rows (the paper: five short
    Wikipedia sentences).

    The merge (``merge``) replaces only the linear layers (attention and MLP projections, weights and
    biases); the merged block keeps block ``l``'s norms, as the official code does.
    ``"rdsc"``: the paper's Eq. 1 (Reserving-Differences-while-Seeking-Common),
    ``theta_l + sum_{k=1}^{C-1} (theta_{l+k} - theta_l)``. ``"official"`` (default): what the official code
    computes. Its in-place update ``theta += theta_{l+k} - theta`` overwrites the base at each ``k``, so the
    merged layers end up as ``theta_{l+C-1}``, the last block's (issues #4 and #5 of the official repository);
    the paper's results come from that code. Eq. 1 taken literally adds ``C - 1`` differences of nearly
    uncorrelated matrices. On SmolLM2-135M, every 4-block ``rdsc`` collapse gives a cosine of 0.0-0.16 and
    a WikiText-2 perplexity of 1e5-1e12 (issue #4 reports a near-zero cosine after the same fix); the
    ``official`` collapse of the same spans gives 0.5-0.95 and 40-1400. With ``C = 2`` the two rules agree.

    Defaults: the paper's settings for the 32-block Llama2-7B, ``C = 4``, ``I = 2``, ``T = 0.65``, and
    ``[L, H]`` covering the whole model as in the official notebooks (``LOWEST_LAY = 0``,
    ``HIGHEST_LAY`` = the last block). We adapt them to any depth as ``L = 0`` and ``H`` = the last block.
    So the first span is ``n-1-C .. n-2`` and the top block is never merged first. ``C`` and ``I`` stay in
    blocks: on 24-32 blocks, 4 and 2 are about the same share of the depth as on Llama2-7B.

    ``T`` is a setting of each model, not of the method: the official notebooks set ``C``, ``I`` and ``T`` by
    hand per model (Llama-13B: 7, 1, 0.45; Baichuan-13B: 3, 1, 0.6). On SmolLM2-135M, ``T = 0.65`` keeps the
    collapse 22-28, whose last hidden states keep a cosine of 0.656 to the original's while its perplexity is
    1e6 to 1e9 on every text measured (8 of the 576 channels of the final norm's output hold more than half of its energy, and they
    survive the collapse). ``benchmarks/compare.py`` runs LaCo over a grid of ``T`` and the table takes the
    ``T`` best on the validation texts of each model (benchmarks/RESULTS.md).

    Removing exactly ``k`` blocks: the paper removes as many blocks as its walk accepts. The official code
    has no rule to reach a target (its notebooks set ``C`` and ``T`` per model by hand). The harness asks
    for ``k``, so (1) a collapse never removes more blocks than are still needed (its span is cut to
    ``k - removed + 1`` blocks) and the walk stops once ``k`` are removed; (2) a walk that ends short is
    repeated from the top on the collapsed model (the reference stays the original) with ``T`` lowered by
    ``step``, further if needed, on the same grid, until the best rejected collapse of the walk would pass.
    This repeats until ``k`` are removed. ``scores["tried"]`` records every trial with its threshold, and
    ``scores["thresholds"]`` the threshold of each walk."""

    name = "laco"
    title = "LaCo (Yang et al., 2024)"
    MERGES = ("official", "rdsc")

    def __init__(self, model: nn.Module, calibration: Tensor,
                 collapse: Annotated[int, "C: blocks merged into one (a base block and the C - 1 after it)"] = 4,
                 interval: Annotated[int, "I: how far the walk moves down after a kept collapse"] = 2,
                 threshold: Annotated[float, "T: a collapse is kept if the last hidden states' cosine to the "
                                             "original model's is above it"] = 0.65,
                 lowest: Annotated[int | None, "L: the walk ends below this block (default 0, the first)"] = 0,
                 highest: Annotated[int | None, "H: the walk starts at block H - C (default: the last block)"]
                 = None,
                 merge: Annotated[str, "'official': the merged block takes the last block's linear layers, as "
                                       "the official code computes; 'rdsc': the paper's Eq. 1, base + sum of "
                                       "differences"] = "official",
                 step: Annotated[float, "how much the threshold drops after a walk that fell short of k"] = 0.05,
                 batch_size: int = 4, device: str | torch.device | None = None, progress: bool = True,
                 search_samples: int | None = None):
        super().__init__(model, calibration, batch_size=batch_size, device=device, progress=progress,
                         search_samples=search_samples)
        count = len(self.arch.layers_of(model))
        check_int("collapse (blocks merged into one)", collapse, 2)
        check_int("interval", interval)
        lowest = 0 if lowest is None else check_int("lowest", lowest, 0, count - 2)
        highest = count - 1 if highest is None else check_int("highest", highest, lowest + collapse, count - 1)
        if highest - collapse < lowest:
            raise ValueError(f"LaCo's walk starts at block highest - collapse = {highest - collapse}, below "
                             f"lowest = {lowest}: a model of {count} blocks is too shallow for collapse={collapse}")
        if merge not in self.MERGES:
            raise ValueError(f"merge must be one of {', '.join(self.MERGES)}, got {merge!r}")
        if not step > 0:
            raise ValueError(f"step must be positive, got {step!r}")
        self.collapse, self.interval, self.threshold, self.step = collapse, interval, float(threshold), float(step)
        self.lowest, self.highest, self.merge = lowest, highest, merge

    def options(self) -> dict:
        return {"collapse": self.collapse, "interval": self.interval, "threshold": self.threshold,
                "lowest": self.lowest, "highest": self.highest, "merge": self.merge, "step": self.step,
                **super().options()}

    @torch.no_grad()
    def _last_hidden(self) -> list[Tensor]:
        """The output of the final norm (``hidden_states[-1]``) on the search batches, float32."""
        base = self.model.get_submodule(self.arch.layers.rsplit(".", 1)[0])
        device = device_of(base)
        return [base(input_ids=ids.to(device), use_cache=False).last_hidden_state.float() for ids in self.search_batches]

    def _similarity(self, reference: list[Tensor]) -> float:
        """The mean over sequences of the cosine between the model's and ``reference``'s last hidden states,
        each sequence flattened to one vector (tokens x channels)."""
        now = self._last_hidden()
        total = sum(F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=-1).sum()
                    for a, b in zip(now, reference))
        return float(total / sum(a.shape[0] for a in now))

    @staticmethod
    def collapsed_block(blocks: list[nn.Module], merge: str = "rdsc") -> nn.Module:
        """A copy of ``blocks[0]`` whose linear layers (weights and biases) are merged from ``blocks``:
        ``theta_0 + sum_k (theta_k - theta_0)`` (``"rdsc"``, computed in float32 at least) or the last block's
        (``"official"``); everything else (the norms) stays ``blocks[0]``'s."""
        if merge not in LaCo.MERGES:
            raise ValueError(f"merge must be one of {', '.join(LaCo.MERGES)}, got {merge!r}")
        merged = resident_copy(blocks[0])
        linear = [f"{name}.{key}" if name else key for name, module in merged.named_modules()
                  if isinstance(module, nn.Linear) for key, _ in module.named_parameters(recurse=False)]
        base = merged.state_dict()
        state = {name: tensor.clone() for name, tensor in base.items()}
        following = [weights_of(block) for block in blocks[1:]]
        for name in linear:
            theta = base[name]
            if merge == "official":
                state[name] = following[-1][name].to(theta.device, theta.dtype).clone()
                continue
            wide = torch.promote_types(theta.dtype, torch.float32)
            total = theta.to(wide)
            for weights in following:
                total = total + (weights[name].to(theta.device, wide) - theta.to(wide))
            state[name] = total.to(theta.dtype)
        merged.load_state_dict(state)
        return merged

    def _lowered(self, drops: int, rejected: list[float]) -> int:
        """How many ``step``s below ``threshold`` the next walk's threshold is: one more than now, and more
        until the best rejected collapse of this walk would pass."""
        drops += 1
        while rejected and not max(rejected) > self.threshold - drops * self.step:
            drops += 1
        return drops

    def compress(self, remove: int | None = None, ratio: float | None = None) -> tuple[nn.Module, Removal]:
        k, start = self.blocks_to_remove(remove, ratio), time.perf_counter()
        count = len(self.arch.layers_of(self.model))
        if k > count - 1 - self.lowest:
            raise ValueError(f"LaCo merges only into blocks {self.lowest} and above: it cannot remove {k}")
        reference = self._last_hidden()
        spans = [(i, i) for i in range(count)]  # the original blocks that each block now stands for
        tried, thresholds, drops = [], [], 0

        def removed() -> int:
            return sum(c - a for a, c in spans)

        def position(block: int) -> int:  # where original block ``block`` (or the collapse holding it) is now
            return next(p for p, (_, c) in enumerate(spans) if c >= block)

        with tqdm(total=k, desc="LaCo", unit="block", disable=not self.progress) as bar:
            while removed() < k:
                threshold = self.threshold - drops * self.step
                thresholds.append(threshold)
                floor = position(self.lowest)
                at = max(position(self.highest) - self.collapse, floor)
                rejected: list[float] = []
                while at >= floor and removed() < k:
                    width = min(self.collapse, len(spans) - at, k - removed() + 1)
                    if width < 2:
                        at -= 1
                        continue
                    layers = self.arch.layers_of(self.model)
                    merged = self.collapsed_block([layers[at + j] for j in range(width)], self.merge)
                    with swapped_blocks(layers, at, at + width, [merged]):
                        similarity = self._similarity(reference)
                    span = (spans[at][0], spans[at + width - 1][1])
                    kept = similarity > threshold
                    tried.append({"span": list(span), "similarity": similarity, "threshold": threshold, "kept": kept})
                    if kept:
                        replace_span(self.model, at, at + width, merged, self.arch)
                        spans[at : at + width] = [span]
                        bar.update(width - 1)
                        at -= self.interval
                    else:
                        rejected.append(similarity)
                        at -= 1
                if removed() < k:
                    drops = self._lowered(drops, rejected)
        collapsed = [span for span in spans if span[1] > span[0]]
        dropped = sorted(i for a, c in collapsed for i in range(a + 1, c + 1))
        return self.model, self.record_removal(start, Collapse, removed=dropped, collapsed=collapsed,
                                        scores={"tried": tried, "thresholds": thresholds})


class _Skipped(nn.Module):
    """Stands in for an attention or MLP sub-layer whose output is zero (removed)."""

    def __init__(self, attention: bool):
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states=None, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.attention else zeros


@register_strategy("blockpruner")
class BlockPruner(Baseline):
    """BlockPruner (Zhong et al., 2024): remove attention and MLP sub-layers one at a time, each time the one
    whose removal raises the calibration loss least, until at least the parameters of ``k`` whole blocks
    are gone. A block left with neither is deleted; a removed sub-layer of a kept block is saved with zero
    output weights (a stock checkpoint cannot omit it), so ``method["parameters_effective"]`` counts the
    parameters that still compute and the layer count is not comparable to the other strategies."""

    name = "blockpruner"
    title = "BlockPruner (Zhong et al., 2024)"
    KINDS = ("attention", "mlp")

    def _sublayer(self, kind: str) -> str:
        return (self.arch.o_proj if kind == "attention" else self.arch.down_proj).rsplit(".", 1)[0]

    def compress(self, remove: int | None = None, ratio: float | None = None) -> tuple[nn.Module, Removal]:
        k, start = self.blocks_to_remove(remove, ratio), time.perf_counter()
        layers = self.arch.layers_of(self.model)
        size = {kind: sum(p.numel() for p in layers[0].get_submodule(self._sublayer(kind)).parameters())
                for kind in self.KINDS}
        budget = k * sum(p.numel() for p in layers[0].parameters())
        skipped: dict[tuple[int, str], nn.Module] = {}  # (block, kind) -> the sub-layer taken out
        order, removed_parameters = [], 0
        with tqdm(total=budget, desc="BlockPruner", unit="param", unit_scale=True, disable=not self.progress) as bar:
            while removed_parameters < budget:
                candidates = {}
                for i, hidden, _ in self.block_inputs(self.search_batches):
                    for kind in self.KINDS:
                        if (i, kind) not in skipped:
                            with self._skipping(i, kind):
                                candidates[(i, kind)] = loss_from(self, hidden, i, self.search_batches)
                best = min(candidates, key=candidates.get)
                skipped[best] = self._skip(*best)
                order.append({"block": best[0], "sublayer": best[1], "loss": candidates[best]})
                removed_parameters += size[best[1]]
                bar.update(size[best[1]])
        for (i, kind), module in skipped.items():  # put back, with zero output weights: a stock checkpoint
            layers[i].set_submodule(self._sublayer(kind), make_resident(module))
            output = layers[i].get_submodule(self.arch.o_proj if kind == "attention" else self.arch.down_proj)
            with torch.no_grad():
                output.weight.zero_()
                if output.bias is not None:
                    output.bias.zero_()
        emptied = sorted(i for i in range(len(layers)) if all((i, kind) in skipped for kind in self.KINDS))
        remove_blocks(self.model, emptied, self.arch)
        zeroed = sorted(key for key in skipped if key[0] not in emptied)
        record = self.record_removal(start, SubLayerRemoval, removed=emptied, zeroed=zeroed, scores={"order": order})
        record.method["parameters_effective"] = count_parameters(self.model) - sum(size[kind] for _, kind in zeroed)
        return self.model, record

    def _skip(self, block: int, kind: str) -> nn.Module:
        layer = self.arch.layers_of(self.model)[block]
        original = layer.get_submodule(self._sublayer(kind))
        layer.set_submodule(self._sublayer(kind), _Skipped(kind == "attention"))
        return original

    @contextmanager
    def _skipping(self, block: int, kind: str):
        original = self._skip(block, kind)
        try:
            yield
        finally:
            self.arch.layers_of(self.model)[block].set_submodule(self._sublayer(kind), original)


@register_strategy("prune-only")
class PruneOnly(Baseline):
    """The ablation "prune only": FlattenGPT's channel scorer (selection and ``down_proj`` refit) applied to
    each block's own MLP, without flattening. Every MLP is pruned to one narrower width (the config's
    ``intermediate_size``, so the model stays a stock checkpoint) such that about as many parameters go as
    ``k`` whole blocks hold. No block is removed, so the model is not faster by ``k`` blocks; attention stays
    whole (a KV group is too coarse a unit to meet the budget: Qwen2.5-0.5B has two per block). Blocks are
    pruned in order, each on the activations that reach it through the blocks pruned below it."""

    name = "prune-only"
    title = "prune only: every MLP narrowed by FlattenGPT's channel scorer, no flattening (ablation)"

    def __init__(self, model: nn.Module, calibration: Tensor,
                 scorer: Annotated[str | ChannelScorer, "what each MLP keeps and how it is refitted"] = "reconstruction",
                 batch_size: int = 4, device: str | torch.device | None = None, progress: bool = True):
        super().__init__(model, calibration, batch_size=batch_size, device=device, progress=progress)
        if self.arch.mlp_inexact:
            raise ValueError(self.arch.refusal("prune-only (it refits each down_proj)", self.arch.mlp_inexact))
        self.scorer = get_scorer(scorer)
        self.scorer_name = scorer if isinstance(scorer, str) else type(scorer).__name__

    def options(self) -> dict:
        return {"scorer": self.scorer_name, "scorer_config": repr(self.scorer)}

    def width_for(self, k: int) -> int:
        """The MLP width at which all blocks together hold about ``k`` blocks' parameters fewer."""
        layers = self.arch.layers_of(self.model)
        block = sum(p.numel() for p in layers[0].parameters())
        width = self.arch.shape_of(self.model.config).intermediate_size
        projections = [self.arch.projections.of(layers[0], path) for path in self.arch.mlp_readers]  # fused: slices
        per_channel = (sum(weight.numel() for weight, _ in projections)
                       + layers[0].get_submodule(self.arch.down_proj).weight.numel()) // width
        per_channel += sum(bias is not None for _, bias in projections)
        drop = round(k * block / (len(layers) * per_channel))
        if drop >= width:
            raise ValueError(f"the parameters of {k} blocks are more than all MLP channels hold; prune-only can "
                             f"remove at most {(width - 1) * len(layers) * per_channel // block} blocks' worth")
        return width - drop

    def compress(self, remove: int | None = None, ratio: float | None = None) -> tuple[nn.Module, Removal]:
        k, start = self.blocks_to_remove(remove, ratio), time.perf_counter()
        config, layers = self.model.config, self.arch.layers_of(self.model)
        shape, width = self.arch.shape_of(config), self.width_for(k)
        inputs = self.capture_inputs()
        hidden = inputs.hidden
        approximate, errors = self.arch.refit_approximation is not None, []  # refits through a norm: measured
        for i in tqdm(range(len(layers)), desc="prune-only", unit="block", disable=not self.progress):
            calls, home = inputs.calls[i], device_of(layers[i])
            with on_device(make_resident(layers[i]), self.device) as block:  # read as tensors; replaced next
                targets = run_block(block, hidden, calls, f"block {i}") if self.scorer.needs_target or approximate else None
                channels = choose_channels(block, self.arch, config, self.scorer, hidden, calls, targets, width)
                narrow = select_block(block, self.arch, config, i, range(shape.num_kv_heads), channels.keep,
                                      down_proj=channels.weight)
                if approximate and channels.weight is not None:  # against the block pruned the same, not refitted
                    unrefitted = select_block(block, self.arch, config, i, range(shape.num_kv_heads), channels.keep)
                    errors.append({"block": i, **refit_error(narrow, unrefitted, self.arch, hidden, calls, targets)})
                del targets
            replace_span(self.model, i, i + 1, narrow.to(home), self.arch)
            if i + 1 < len(layers):
                hidden = self.run_layer(layers[i], hidden, calls, name=f"block {i} (pruned)")
        setattr(config, self.arch.intermediate_size_field, width)
        return self.model, self.record_removal(start, WidthPruning, mlp_width=(shape.intermediate_size, width),
                                        **({"scores": {"refit": errors}} if errors else {}))


class _ContiguousCut(Baseline):
    """Shared by the angular cut and ReplaceMe: one contiguous run of ``k`` blocks, chosen by the angular
    distance ``arccos(cos(x_s, x_{s+k})) / pi`` between the run's input and its output (the input of the
    block after it, or the last block's output), averaged over the calibration sequences' last tokens (the
    papers' choice, ``tokens="last"``) or over all their tokens (``tokens="all"``)."""

    def __init__(self, model: nn.Module, calibration: Tensor,
                 tokens: Annotated[str, "last or all: the tokens the angular distance is averaged over"] = "last",
                 batch_size: int = 4, device: str | torch.device | None = None, progress: bool = True):
        super().__init__(model, calibration, batch_size=batch_size, device=device, progress=progress)
        self.tokens = check_choice("tokens", tokens, TOKENS)

    def options(self) -> dict:
        return {"tokens": self.tokens}

    def cut_distances(self, k: int) -> Tensor:
        return cut_distances(self, k, self.tokens)


@register_strategy("angular")
class AngularCut(_ContiguousCut):
    """The angular-distance cut of Gromov et al. ("The unreasonable ineffectiveness of the deeper layers",
    2024), without healing: delete the contiguous run of ``k`` blocks whose input and output are closest in
    angular distance."""

    name = "angular"
    title = "angular-distance cut (Gromov et al., 2024), no healing"

    def compress(self, remove: int | None = None, ratio: float | None = None) -> tuple[nn.Module, Removal]:
        k, start = self.blocks_to_remove(remove, ratio), time.perf_counter()
        distances = self.cut_distances(k)
        first = int(distances.argmin())
        remove_blocks(self.model, list(range(first, first + k)), self.arch)
        return self.model, self.record_removal(start, removed=list(range(first, first + k)),
                                        scores={"cut_distances": distances.tolist()})


@register_strategy("replaceme")
class ReplaceMe(_ContiguousCut):
    """ReplaceMe (Shopkhoev et al., 2025, arXiv 2505.02819), its least-squares variant: delete the contiguous
    run of ``k`` blocks ``s .. s+k-1`` of least angular distance (a run that starts at block 0 has no block
    before it and is not a candidate), and replace it by one linear map ``T`` (hidden x hidden) folded into
    the ``down_proj`` of block ``s - 1``: with ``m`` that block's MLP output and ``r`` its residual stream
    before the MLP is added (so its output is ``r + m``), ``T`` minimises ``||m T + r - x_{s+k}||^2`` over
    the calibration tokens (plus ``ridge * ||T||^2``, ``ridge`` in units of the mean eigenvalue of ``m^T m``;
    the paper's default is none), and block ``s - 1`` then outputs ``r + m T``.

    Where a norm follows ``down_proj`` (Gemma 3: the block outputs ``r + g * m / rms(m)``), no ``T`` makes the
    output linear in it: ``m T`` is fitted instead, by the same least squares, to each token's output direction
    that comes closest to ``x_{s+k} - r`` through that norm, at the scale of ``m``
    (``flatten.calibration.post_norm_direction``), an approximation (``Architecture.refit_approximation``) whose
    error on the calibration tokens the record holds (``scores["refit"]``, ``flatten.calibration.refit_error``)."""

    name = "replaceme"
    title = "ReplaceMe (Shopkhoev et al., 2025), least-squares linear replacement"

    def __init__(self, model: nn.Module, calibration: Tensor, tokens: str = "last",
                 ridge: Annotated[float, "ridge of the map's least squares, in units of the mean eigenvalue"] = 0.0,
                 batch_size: int = 4, device: str | torch.device | None = None, progress: bool = True):
        super().__init__(model, calibration, tokens=tokens, batch_size=batch_size, device=device, progress=progress)
        if self.arch.mlp_inexact:  # refused; a family whose refits run approximately (refit_approximation) runs
            raise ValueError(self.arch.refusal("ReplaceMe (its map is folded into a down_proj)", self.arch.mlp_inexact))
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
            raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")
        self.ridge = float(ridge)

    def options(self) -> dict:
        return {**super().options(), "ridge": self.ridge}

    def compress(self, remove: int | None = None, ratio: float | None = None) -> tuple[nn.Module, Removal]:
        k, start = self.blocks_to_remove(remove, ratio), time.perf_counter()
        count = len(self.arch.layers_of(self.model))
        if k > count - 1:
            raise ValueError(f"ReplaceMe keeps a block before the cut: it can remove at most {count - 1} of {count}")
        distances = self.cut_distances(k)
        first = 1 + int(distances[1:].argmin())
        transform, fitted = self._fit(first, k)
        kept = make_resident(self.arch.layers_of(self.model)[first - 1])
        before = copy.deepcopy(kept) if fitted is not None else None  # the block as it was, for the refit's error
        down = kept.get_submodule(self.arch.down_proj)
        with torch.no_grad():  # folded where T was solved (the computing device), written back where the weights live
            weight = down.weight.to(transform.device)
            down.weight.copy_((transform.T @ weight.double()).to(weight.dtype))
            if down.bias is not None:
                bias = down.bias.to(transform.device)
                down.bias.copy_((bias.double() @ transform).to(bias.dtype))
        scores = {"cut_distances": distances.tolist(), "transform_folded_into": first - 1}
        if fitted is not None:  # an approximate fit through the norm after down_proj: its error, measured
            with on_device(kept, self.device):
                scores["refit"] = refit_error(kept, before, self.arch, *fitted)
        removed = list(range(first, first + k))
        remove_blocks(self.model, removed, self.arch)
        return self.model, self.record_removal(start, removed=removed, scores=scores)

    def transform(self, first: int, k: int) -> Tensor:
        """``T`` (float64, on the computing device) for the cut of blocks ``first .. first+k-1``, from the
        calibration data."""
        return self._fit(first, k)[0]

    @torch.no_grad()
    def _fit(self, first: int, k: int) -> tuple[Tensor, tuple | None]:
        """``T``, and where it is fitted through a norm after ``down_proj``, the input of block ``first - 1``,
        its other arguments and the targets (for ``refit_error``; else None)."""
        layers = self.arch.layers_of(self.model)
        d = self.model.config.hidden_size
        gram = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        cross = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        inputs = self.capture_inputs()
        hidden = inputs.hidden
        for i in range(first - 1):
            hidden = self.run_layer(layers[i], hidden, inputs.calls[i], name=f"block {i}")
        mlp_out: list[Tensor] = []  # block first-1's MLP output (down_proj's), one tensor per batch
        residual: list[Tensor] = []  # and its residual stream r, where the MLP reads it
        block = layers[first - 1]
        post = self.arch.mlp_post_norm if self.arch.refit_approximation else None
        hooks = [block.get_submodule(self.arch.down_proj).register_forward_hook(
                     lambda module, args, out: mlp_out.append(out.detach())),
                 block.get_submodule(self.arch.mlp_input).register_forward_pre_hook(
                     lambda module, args: residual.append(args[0].detach()))]
        try:
            outputs = self.run_layer(block, hidden, inputs.calls[first - 1], name=f"block {first - 1}")
        finally:
            for hook in hooks:
                hook.remove()
        targets = outputs
        for j in range(first, first + k):
            targets = self.run_layer(layers[j], targets, inputs.calls[j], name=f"block {j}")
        gain = None if post is None else self.arch.norm_scale(
            block.get_submodule(post).weight.detach().double()).to(self.device)
        for m, y, r, target in zip(mlp_out, outputs, residual, targets):
            m, y, r, target = (t.reshape(-1, d).to(self.device).double() for t in (m, y, r, target))
            want = target - (y - m)  # y = r + m
            if gain is not None:  # y = r + norm(m): m T fitted to the best direction through the norm, at m's scale
                want = post_norm_direction(target - r, gain) * m.square().mean(-1, keepdim=True).sqrt()
            gram += m.T @ m
            cross += m.T @ want
        gram.diagonal().add_(self.ridge * float(gram.diagonal().mean()))
        return _minimum_norm_solution(gram, cross), (None if post is None else (hidden, inputs.calls[first - 1], targets))


def _minimum_norm_solution(gram: Tensor, cross: Tensor) -> Tensor:
    """The minimum-norm ``T`` of least ``||gram T - cross||`` (``gram`` symmetric positive semi-definite,
    float64), computed where ``gram`` is. On the CPU, LAPACK's SVD-based ``gelsd``. CUDA has no ``gelsd``
    (``torch.linalg.lstsq`` takes only ``gels`` there, a QR that assumes full rank: fewer calibration tokens than
    hidden channels make ``gram`` singular), so elsewhere the same solution from the eigendecomposition of
    ``gram``, with ``gelsd``'s default cut-off (singular values, here ``|eigenvalues|``, up to ``n * eps`` times
    the largest count as zero): equal to ``gelsd``'s within rounding."""
    if gram.device.type == "cpu":
        return torch.linalg.lstsq(gram, cross, driver="gelsd").solution
    values, vectors = torch.linalg.eigh(gram)
    size = values.abs()
    kept = size > size.max() * gram.shape[0] * torch.finfo(gram.dtype).eps
    inverse = torch.where(kept, 1 / torch.where(kept, values, torch.ones_like(values)), torch.zeros_like(values))
    return vectors @ (inverse[:, None] * (vectors.mT @ cross))
