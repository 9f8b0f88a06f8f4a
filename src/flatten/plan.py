"""A compression plan: every step (merge, absorb, drop), as data that saves, loads and re-applies."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from torch import Tensor, nn

from flatten.files import tensors_sha256, write_atomically
from flatten.models.architectures import architecture_for
from flatten.pair import BlockRun

FORMAT = "flatten-plan/1"


def model_signature(model: nn.Module) -> dict:
    """What a plan needs to match in a model: family and block shape and count."""
    arch = architecture_for(model)
    shape = arch.shape_of(model.config)
    return {"model_type": model.config.model_type, "num_layers": len(arch.layers_of(model)),
            "hidden_size": model.config.hidden_size, **asdict(shape)}


@dataclass
class Merge:
    """One step: blocks ``position`` .. ``position + count - 1`` of the model at that moment (covering original
    blocks ``span``, inclusive) became one block keeping these groups and channels of their flattened run:
    of several blocks (a merge), or of one (an absorb, with refitted writers, or a drop)."""

    position: int
    span: tuple[int, int]
    similarity: float | None
    keep_groups: list[int]
    keep_channels: list[int]
    o_proj: Tensor | None = None
    down_proj: Tensor | None = None
    selection: dict | None = None  # merge_by_objective: the candidates chosen and every candidate's residual
    count: int = 2  # blocks flattened into one: this step removes count - 1 blocks

    def whole_block(self, num_kv_heads: int, intermediate_size: int) -> int | None:
        """The block (0 .. count - 1) whose heads and channels the step kept, all of them and nothing else
        (the others were dropped, or absorbed if it has compensation weights), or None for a flattening,
        given the model's ``num_kv_heads`` and ``intermediate_size`` per block."""
        for side in range(self.count):
            if (self.keep_groups == list(range(side * num_kv_heads, (side + 1) * num_kv_heads))
                    and self.keep_channels == list(range(side * intermediate_size, (side + 1) * intermediate_size))):
                return side
        return None

    def kept(self, num_kv_heads: int, intermediate_size: int) -> str:
        """For a pair: ``"both"`` for a flattening; ``"first"`` or ``"second"`` where the merge kept one block's
        heads and channels (see ``whole_block``)."""
        side = self.whole_block(num_kv_heads, intermediate_size)
        return "both" if side is None else ("first", "second")[side] if side < 2 else f"block {side + 1}"

    def apply(self, model: nn.Module) -> None:
        run = BlockRun(model, self.position, self.count)
        run.replace(run.prune(run.flatten(), self.keep_groups, self.keep_channels, self.o_proj, self.down_proj))


@dataclass
class Plan:
    file_name: ClassVar[str] = "plan.json"  # beside a saved checkpoint

    model: dict  # model_signature of the model the plan was made for (before compression)
    method: dict = field(default_factory=dict)  # scorer, policy, similarity, calibration: how it was made
    similarity: list[list[float]] | None = None  # block-input similarity matrix of the original model
    merges: list[Merge] = field(default_factory=list)

    @property
    def removed(self) -> int:
        return sum(merge.count - 1 for merge in self.merges)

    @property
    def spans(self) -> list[tuple[int, int]]:
        """Final spans of original blocks that became one block (each merge extends or adds one)."""
        spans: list[tuple[int, int]] = []
        for merge in self.merges:
            spans = [s for s in spans if not (merge.span[0] <= s[0] and s[1] <= merge.span[1])] + [tuple(merge.span)]
        return sorted(spans)

    def steps(self) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
        """What each merge did, as ``(kind, kept, removed)`` in original block indices: ``"merged"`` (flattened
        and pruned back, groups or channels of several blocks kept; ``kept`` is the first block's span,
        ``removed`` the span of the others, now one block with it), ``"absorbed"`` (one block's groups and
        channels kept, its writers refitted to compute what the blocks computed) or ``"dropped"`` (one block
        kept as it was). A step of several blocks that kept one whole gives one entry per other block."""
        groups, channels = self.model["num_kv_heads"], self.model["intermediate_size"]
        blocks = [(i, i) for i in range(self.model["num_layers"])]
        steps = []
        for merge in self.merges:
            p, n = merge.position, merge.count
            run = blocks[p : p + n]
            side = merge.whole_block(groups, channels)
            if side is None:
                steps.append(("merged", run[0], (run[1][0], run[-1][1])))
            else:
                kind = "dropped" if merge.o_proj is None and merge.down_proj is None else "absorbed"
                steps += [(kind, run[side], gone) for i, gone in enumerate(run) if i != side]
            blocks[p : p + n] = [(run[0][0], run[-1][1])]
        return steps

    def removed_blocks(self) -> dict[str, list[tuple[int, int]]]:
        """The spans of original blocks that a step removed whole, keeping the other block of its pair:
        ``"dropped"`` as they were, ``"absorbed"`` where the kept block was fitted to compute what the two
        computed."""
        removed = {"dropped": [], "absorbed": []}
        for kind, _, gone in self.steps():
            if kind != "merged":
                removed[kind].append(gone)
        return {how: sorted(spans) for how, spans in removed.items()}

    def describe(self) -> str:
        """What was done, block by block (original indices), e.g. ``merged 12+13; absorbed 14 into 12-13``."""
        def name(span):
            return str(span[0]) if span[0] == span[1] else f"{span[0]}-{span[1]}"

        prune = self.method.get("prune", True)  # an ablation leaves flattened blocks (or one half) wide
        merged = "merged" if prune is True else "flattened"
        words = [f"{merged} {name(a)}+{name(b)}" if kind == "merged" else
                 f"absorbed {name(b)} into {name(a)}" if kind == "absorbed" else f"dropped {name(b)}"
                 for kind, a, b in self.steps()]
        how = ", ".join(f"{key} {self.method[key]}" for key in ("scorer", "policy") if key in self.method)
        if prune is not True:
            how += f", prune={prune}: kept wide, not a stock checkpoint"
        return "; ".join(words) + (f" ({how})" if how else "")

    def apply(self, model: nn.Module) -> nn.Module:
        """Replay the plan on a fresh copy of the model it was made for (in place); return the model."""
        have = model_signature(model)
        if have != self.model:
            diff = {k: (self.model.get(k), have.get(k)) for k in set(have) | set(self.model) if have.get(k) != self.model.get(k)}
            raise ValueError(f"this plan was made for another model; (plan, model) differ in: {diff}")
        for merge in self.merges:
            merge.apply(model)
        return model

    def resume(self, checkpoint: str | Path) -> list["Merge"]:
        """This new plan continued from the plan saved at ``checkpoint``, if that file exists: its similarity,
        search log and choices are taken in, and its merges returned (the caller replays them). Refused where
        it was made for another model, with other settings (``method``) or removes more blocks."""
        checkpoint = Path(checkpoint)
        if not checkpoint.exists():
            return []
        saved = Plan.load(checkpoint)
        if saved.model != self.model:
            raise ValueError(f"the checkpoint {checkpoint} was made for another model ({saved.model}), "
                             f"not this one ({self.model})")
        differ = sorted(key for key, value in self.method.items() if saved.method.get(key) != value)
        if differ:
            raise ValueError(f"the checkpoint {checkpoint} was made with other settings: "
                             + "; ".join(f"{key} {saved.method.get(key)!r}, now {self.method[key]!r}" for key in differ)
                             + ". Use the same settings to resume it, or another checkpoint file.")
        if saved.removed > self.method["remove"]:
            raise ValueError(f"the checkpoint {checkpoint} removes {saved.removed} blocks, more than the "
                             f"{self.method['remove']} to remove")
        self.similarity = saved.similarity
        for key in ("search", "merge_choices", "cut_distances"):
            if key in saved.method:
                self.method[key] = saved.method[key]
        return saved.merges

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON at ``path``, and compensation weights (if any) beside it as
        ``<path>.<digest>.safetensors``. The JSON is written last and names its weights file, so an
        interrupted save leaves the previous plan at ``path`` whole, with its own weights."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"merges.{i}.{name}": getattr(m, name).detach().cpu().contiguous()
                   for i, m in enumerate(self.merges) for name in ("o_proj", "down_proj") if getattr(m, name) is not None}
        weights = path.with_name(f"{path.name}.{tensors_sha256(tensors.items())[:16]}.safetensors")
        document = {
            "format": FORMAT, "model": self.model, "method": self.method, "similarity": self.similarity,
            "weights": weights.name if tensors else None,
            "merges": [{"position": m.position, "span": list(m.span), "similarity": m.similarity,
                        "keep_groups": list(m.keep_groups), "keep_channels": list(m.keep_channels),
                        **({"count": m.count} if m.count != 2 else {}),
                        **({"selection": m.selection} if m.selection is not None else {})} for m in self.merges],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = _weights_named_by(path)
        if tensors and not weights.exists():
            write_atomically(weights, lambda tmp: save_file(tensors, tmp))
        write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(document, indent=1)))
        if previous is not None and previous != weights and previous.is_file():
            previous.unlink()
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        from safetensors.torch import load_file

        path = Path(path)
        try:
            document = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable plan: {error}") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"{path} is not a plan of format {FORMAT!r}")
        tensors = {}
        if document.get("weights"):
            weights = path.with_name(str(document["weights"]))
            try:
                tensors = load_file(weights)
            except Exception as error:  # safetensors raises its own error types for damaged files
                raise ValueError(f"the plan's weights {weights} cannot be read: {error}") from None
        try:
            merges = [Merge(int(m["position"]), (int(m["span"][0]), int(m["span"][1])), m["similarity"],
                            [int(g) for g in m["keep_groups"]], [int(c) for c in m["keep_channels"]],
                            tensors.get(f"merges.{i}.o_proj"), tensors.get(f"merges.{i}.down_proj"),
                            _selection(m.get("selection")), int(m.get("count", 2)))
                      for i, m in enumerate(document["merges"])]
            return cls(dict(document["model"]), document.get("method", {}), document.get("similarity"), merges)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as error:
            raise ValueError(f"{path} is a malformed plan: {error!r}") from None


def _selection(value) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"a merge's selection must be an object, got {value!r}")
    return value


def _weights_named_by(path: Path) -> Path | None:
    """The weights file that the plan already at ``path`` (if any) refers to."""
    try:
        name = json.loads(path.read_text()).get("weights")
    except (OSError, ValueError, AttributeError):
        return None
    return path.with_name(name) if isinstance(name, str) and "/" not in name and name.startswith(path.name) else None
