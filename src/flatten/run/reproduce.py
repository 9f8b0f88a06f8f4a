"""``flatten reproduce``: run the command that made a saved model again, and compare every weight."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from flatten.models.record import RunRecord


@dataclass
class Reproduction:
    tensors: int  # in the saved model
    differ: list[str]  # names of the tensors that are not bit-identical (or missing on one side)
    source_changed: bool  # the source model's weights are not those the recorded run started from

    @property
    def identical(self) -> bool:
        return not self.differ


def recorded_command(folder: str | Path) -> tuple[list[str], str]:
    """The ``flatten`` arguments that made ``folder`` and the folder they ran in."""
    made_by = RunRecord.load(folder).made_by()
    argv, cwd = made_by["argv"], made_by["cwd"] or os.getcwd()
    if not isinstance(argv, list) or not argv or argv[0] not in ("compress", "recover"):
        raise ValueError(f"{folder}'s run record holds no flatten compress or recover command to re-run")
    if not Path(cwd).is_dir():
        raise FileNotFoundError(f"the recorded command ran in {cwd}, which no longer exists")
    return argv, cwd


def reproduce(folder: str | Path, run: Callable[[list[str]], int]) -> Reproduction:
    """Re-run the command recorded in ``folder`` with ``run`` (the ``flatten`` command's entry point,
    ``flatten.run.cli.main``) in its recorded folder, into a temporary output, and compare every tensor."""
    from safetensors.torch import load_file

    folder = Path(folder)
    argv, cwd = recorded_command(folder)
    with tempfile.TemporaryDirectory(prefix="flatten-reproduce-") as scratch:
        again = Path(scratch) / "again"
        quiet = ["--out", str(again), "--overwrite", "--no-eval", "--quiet"] + \
            (["--no-latency"] if argv[0] == "compress" else []) + \
            (["--gguf", str(Path(scratch) / "again.gguf")] if "--gguf" in argv else [])  # the user's file stays
        here = os.getcwd()
        try:
            os.chdir(cwd)
            code = run(argv + quiet)
        finally:
            os.chdir(here)
        if code != 0:
            raise ValueError(f"the recorded command failed (exit status {code}); see above")
        recorded = RunRecord.load(folder).made_by()["source_sha256"]
        source_changed = bool(recorded) and RunRecord.load(again).made_by()["source_sha256"] != recorded
        saved, redone = _tensors(folder, load_file), _tensors(again, load_file)
    differ = sorted(k for k in saved.keys() | redone.keys()
                    if k not in saved or k not in redone or not torch.equal(saved[k], redone[k]))
    return Reproduction(len(saved), differ, source_changed)


def _tensors(folder: Path, load_file) -> dict:
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no model*.safetensors weights")
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors
