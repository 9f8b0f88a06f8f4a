"""A saved model's run record (``flatten_run.json``): the command, data and decisions that made it, and its
results before and after. It travels with the checkpoint: ``flatten export``, ``recover`` and ``reproduce``
read it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from flatten.files import write_atomically

RUN_RECORD = "flatten_run.json"


@dataclass
class Results:
    """Before and after a compression: each list holds the two, measured in the same process."""

    layers: list[int]
    parameters: list[int]  # the parameters that still compute (BlockPruner's zeroed sub-layers left out)
    perplexity: list[list[dict]]  # per text: [before, after] of ``Perplexity.as_dict()``
    latency: list[list[dict]]  # per batch size: [before, after] of ``Latency.as_dict()``
    compression_seconds: float
    peak_memory_gib: float
    latency_ratios: list[dict] = field(default_factory=list)  # per batch size: after / before, ``Ratio.as_dict()``


@dataclass
class RunRecord:
    """What ``flatten_run.json`` holds: the run that made a saved model, one type for every strategy (its
    decisions, a ``Plan`` or a baseline's ``Removal``, are saved beside it under the name ``decisions``).
    A recovery adds ``recovery``; a model recovered without a compression of ours has only the first two."""

    name: str
    base_model: str
    source_sha256: str | None = None  # the weights the run started from (``weights_sha256``)
    command: str | None = None
    argv: list[str] | None = None  # the ``flatten`` arguments, for ``flatten reproduce``
    cwd: str | None = None
    versions: dict | None = None
    machine: str | None = None
    calibration: dict | None = None  # source, samples, seq_len, seed, sha256 of the tokens
    strategy: str | None = None  # the strategy's title
    what: str | None = None  # the decisions in a few words
    method: dict | None = None  # the strategy's options and bookkeeping (``record.method``)
    decisions: str | None = None  # the file beside the checkpoint: plan.json or removal.json
    results: Results | None = None
    recovery: dict | None = None  # ``flatten recover``: its command, data and result

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / RUN_RECORD
        write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(asdict(self), indent=1) + "\n"))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "RunRecord":
        path = Path(folder) / RUN_RECORD
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no {RUN_RECORD}: it was not written by flatten compress or recover")
        try:
            found = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable run record: {error}") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(found, dict) or not {"name", "base_model"} <= found.keys() or found.keys() - known:
            raise ValueError(f"{path} is not a run record (expected the keys {', '.join(sorted(known))})")
        if found.get("results") is not None:
            found["results"] = Results(**found["results"])
        return cls(**found)

    def made_by(self) -> dict:
        """``argv``, ``cwd`` and ``source_sha256`` of the command that made the folder: the recovery, if any."""
        source = self.recovery or asdict(self)
        return {key: source.get(key) for key in ("argv", "cwd", "source_sha256")}
