"""The one compress -> measure -> report pipeline: ``flatten compress`` and the benchmarks run through it.

    from flatten.run.pipeline import Amount, CompressJob
    from flatten.strategies.options import Method

    report = CompressJob("smollm2-135m", Method.parse("cut-absorb"), out="out/smol", amount=Amount(remove=6)).run()
    report.record.results.perplexity   # [before, after] per text

``CompressJob.run`` loads the model, calibrates, measures before, compresses, measures after, and writes the
checkpoint with its record, model card and figures. Its steps are public for scripts that compose them in
another order (``benchmarks/compare.py`` sweeps methods over one loaded model): ``load``, ``Calibration``,
``PerplexityTexts``, ``Amount``, ``compress_timed``, ``Latency``.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flatten.checks import check_fraction


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class Dispatch:
    """accelerate's placement of a model larger than one device (``load_model``'s keywords of the same names)."""

    device_map: str
    max_memory: dict | None = None  # e.g. {0: "70GiB", "cpu": "100GiB"}
    offload_folder: str | None = None


def load(source: str, dtype: torch.dtype | str = torch.float32, dispatch: Dispatch | None = None,
         log: Callable[[str], None] = log_to_stderr):
    """``(model, tokenizer)``; with ``dispatch``, placed by accelerate (the blocks' places are logged)."""
    from flatten.models.architectures import architecture_for
    from flatten.models.loading import load_model

    log(f"loading {source} ...")
    placement = {} if dispatch is None else {"device_map": dispatch.device_map, "max_memory": dispatch.max_memory,
                                             "offload_folder": dispatch.offload_folder}
    model, tokenizer = load_model(source, dtype=dtype, **placement)
    if dispatch is not None:
        blocks = f"{architecture_for(model).layers}."
        places = Counter(str(v) for k, v in model.hf_device_map.items() if k.startswith(blocks))
        log("device map: blocks " + ", ".join(f"{n} on {place}" for place, n in places.items()))
    return model, tokenizer


@dataclass(frozen=True)
class Calibration:
    """Which calibration tokens: ``samples`` windows of ``seq_len`` tokens of ``source`` (a mix or corpus of
    ``flatten.data``, a text file or ``hf:DATASET``; None is the default mix), drawn with ``seed``."""

    source: str | None = None
    samples: int = 32
    seq_len: int = 512
    seed: int = 0

    def check(self) -> None:
        """A text file that is missing or empty is refused before any weights load."""
        from flatten.data import CORPORA, MIXES, read_lines

        if self.source is not None and self.source not in MIXES and self.source not in CORPORA \
                and not self.source.startswith("hf:"):
            read_lines(self.source)

    def tokens(self, tokenizer) -> tuple[torch.Tensor, dict]:
        """The token ids (samples x seq_len) and what they are, as a run record holds it."""
        from flatten.data import calibration_description, calibration_tokens, token_sha256

        ids = calibration_tokens(tokenizer, self.source, samples=self.samples, seq_len=self.seq_len, seed=self.seed)
        return ids, {"source": calibration_description(self.source), "samples": self.samples,
                     "seq_len": self.seq_len, "seed": self.seed, "sha256": token_sha256(ids)}


@dataclass(frozen=True)
class PerplexityTexts:
    """The perplexity protocol: the first ``windows`` windows of ``seq_len`` tokens of each text (a corpus of
    ``flatten.data`` or a text file; None: WikiText-2's test split where it lies, else held-out Wikipedia leads)."""

    texts: tuple[str | None, ...] = (None, "alice")
    windows: int = 32
    seq_len: int = 512

    def tokens(self, tokenizer) -> list[tuple[torch.Tensor, str]]:
        """Token ids and a description of each text."""
        from flatten.data import evaluation_text, tokenize

        found = []
        for source in self.texts:
            text, about = evaluation_text(source)
            found.append((tokenize(tokenizer, text, max_tokens=self.windows * self.seq_len), about))
        return found

    def measure(self, model: torch.nn.Module, texts: list[tuple[torch.Tensor, str]], device: torch.device,
                progress: bool = False) -> list[dict]:
        """``Perplexity.as_dict()`` of ``model`` on each of ``texts`` (from ``tokens``), computed on ``device``
        (a model dispatched by accelerate computes where its parts are) and put back where it was."""
        from flatten.evaluation.perplexity import perplexity
        from flatten.models.dispatch import is_dispatched

        placed, was = is_dispatched(model), next(model.parameters()).device
        if not placed:
            model.to(device)
        found = [perplexity(model, ids, seq_len=self.seq_len, max_windows=self.windows, text=about,
                            progress=progress).as_dict() for ids, about in texts]
        if not placed:
            model.to(was)
        return found


@dataclass(frozen=True)
class Amount:
    """How many blocks to remove: ``remove`` blocks, a ``ratio`` of the parameters (the paper's convention) or
    a ``fraction`` of the blocks; none of them: the strategy's own options decide where they can, else 0.2
    of the blocks."""

    remove: int | None = None
    ratio: float | None = None
    fraction: float | None = None

    def check(self, source: str) -> None:
        """What needs only numbers and the model's config is refused before the weights load."""
        from flatten.models.loading import layer_count

        if sum(x is not None for x in (self.remove, self.ratio, self.fraction)) > 1:
            raise ValueError("give one of remove, ratio and fraction")
        if self.ratio is not None:
            check_fraction("--ratio", self.ratio, "a fraction of the parameters")
        if self.fraction is not None:
            check_fraction("--fraction", self.fraction, "a fraction of the blocks")
        if self.remove is None:
            return
        count = layer_count(source)
        if self.remove < 1 or count is not None and self.remove > count - 1:
            raise ValueError(f"cannot remove {self.remove} of {count if count is not None else 'its'} blocks: "
                             f"--remove must be from 1 to {count - 1 if count is not None else 'one fewer than it has'}")

    def blocks(self, compressor) -> int | None:
        """The ``remove`` to pass to ``compressor.compress`` (None: its options decide)."""
        layers = len(compressor.arch.layers_of(compressor.model))
        if self.remove is not None:
            return self.remove
        if self.ratio is not None:
            return compressor.blocks_for_ratio(self.ratio)
        if self.fraction is None and compressor.default_removals() is not None:
            return None
        return max(1, round((0.2 if self.fraction is None else self.fraction) * layers))


@dataclass
class Compressed:
    """One compression and its cost."""

    model: torch.nn.Module
    decisions: object  # the strategy's record: a ``Plan`` or a baseline's ``Removal``
    seconds: float
    peak_memory_bytes: int  # resident set of the process while it ran (it holds the dense model too)
    baseline_memory_bytes: int  # resident set as it started
    cuda_peak_bytes: int | None


def compress_timed(compressor, remove: int | None) -> Compressed:
    """``compressor.compress(remove=remove)``, timed (the work queued on its device included), with the peak
    memory it took."""
    from flatten.evaluation.latency import synchronize
    from flatten.evaluation.measure import PeakMemory

    with PeakMemory() as memory:
        synchronize(compressor.device)
        start = time.perf_counter()
        model, decisions = compressor.compress(remove=remove)
        synchronize(compressor.device)
        seconds = time.perf_counter() - start
    return Compressed(model, decisions, seconds, memory.peak_bytes, memory.baseline_bytes, memory.cuda_peak_bytes)


@dataclass(frozen=True)
class Latency:
    """Prefill and decode latency of the result against the original, runs interleaved, per batch size."""

    batches: tuple[int, ...] = (1,)
    prompt: int = 128
    new_tokens: int = 32
    repeats: int = 9

    def measure(self, model, original, device) -> tuple[list[list[dict]], list[dict]]:
        """``[before, after]`` per batch size, and the after / before ratios with their spread."""
        from flatten.evaluation.latency import latency_ratios

        pairs, ratios = [], []
        model.to(device)
        original.to(device)
        for batch in self.batches:
            after, before, prefill, decode = latency_ratios(model, original, batch=batch, prompt=self.prompt,
                                                            new_tokens=self.new_tokens, repeats=self.repeats)
            pairs.append([before.as_dict(), after.as_dict()])
            ratios.append({"batch": batch, "prefill": prefill.as_dict(), "decode": decode.as_dict()})
        model.to("cpu")
        original.to("cpu")
        return pairs, ratios


@dataclass
class CompressReport:
    """What ``CompressJob.run`` made: the compressed model (also saved under ``out``) and what was written."""

    model: torch.nn.Module
    decisions: object
    record: object  # the ``RunRecord`` saved as flatten_run.json
    out: Path
    figures: list[str]


@dataclass
class CompressJob:
    """Compress ``model`` (an embedded name, folder, hub id or .gguf file) with ``method`` and save the result
    under ``out`` with its record (what ``flatten compress`` does; ``argv`` is recorded for ``flatten
    reproduce``). ``texts=None`` skips the perplexity, ``latency=None`` the timing."""

    model: str
    method: object  # a ``flatten.strategies.options.Method``
    out: Path
    amount: Amount = field(default_factory=Amount)
    calibration: Calibration = field(default_factory=Calibration)
    texts: PerplexityTexts | None = field(default_factory=PerplexityTexts)
    latency: Latency | None = field(default_factory=Latency)
    dtype: torch.dtype | str = torch.float32
    device: str | torch.device = "auto"
    dispatch: Dispatch | None = None
    batch_size: int = 4
    overwrite: bool = False
    progress: bool = True
    argv: list[str] = field(default_factory=list)
    log: Callable[[str], None] = log_to_stderr

    def __post_init__(self):
        self.out = Path(self.out)

    def check(self) -> None:
        """Everything that can be refused before the weights load: the output, the method, the amount."""
        check_output(self.out, self.overwrite)
        self.method.arguments()
        self.amount.check(self.model)
        self.calibration.check()

    def run(self) -> CompressReport:
        from flatten.models.checkpoint import save_checkpoint
        from flatten.models.loading import resolve_device
        from flatten.run.report import write_report

        self.check()
        device = resolve_device(self.device)
        model, tokenizer = load(self.model, self.dtype, self.dispatch, self.log)
        source = _Original(model, *self.calibration.tokens(tokenizer))
        compressor = self.method.build(model, source.calibration, batch_size=self.batch_size, device=device,
                                       progress=self.progress)
        remove = self.amount.blocks(compressor)
        compressor.blocks_to_remove(remove)  # validate before any expensive work
        texts = [] if self.texts is None else self.texts.tokens(tokenizer)
        before = self.texts.measure(model, texts, device, self.progress) if texts else []
        original = self._original_for_latency(model)
        done = compress_timed(compressor, remove)
        after = self.texts.measure(done.model, texts, device, self.progress) if texts else []
        latency, ratios = ([], []) if original is None else self.latency.measure(done.model, original, device)
        record = self._run_record(source, compressor.title, done, [list(p) for p in zip(before, after)], latency,
                                  ratios)
        figures = []
        save_checkpoint(done.model, self.out, tokenizer, overwrite=self.overwrite,
                        extras=lambda folder: figures.extend(write_report(folder, record, done.decisions)))
        return CompressReport(done.model, done.decisions, record, self.out, figures)

    def _original_for_latency(self, model):
        """A copy of the original to time beside the result, or None where timing is off or the model may not
        fit twice (``dtype="auto"``, a dispatched model)."""
        if self.latency is None:
            return None
        if self.dtype == "auto" or self.dispatch is not None:
            self.log(f"latency skipped with {'--dtype auto' if self.dtype == 'auto' else '--device-map'} (it would "
                     "keep a copy of the original in memory); time the result against the original with: flatten "
                     "bench OUT --against MODEL")
            return None
        return copy.deepcopy(model)

    def _run_record(self, source: "_Original", strategy: str, done: Compressed, perplexity, latency, ratios):
        from flatten.evaluation.measure import machine
        from flatten.models.loading import count_parameters
        from flatten.models.record import Results, RunRecord
        from flatten.run.report import command_line, versions

        decisions = done.decisions
        return RunRecord(
            name=self.out.name, base_model=self.model, source_sha256=source.sha256, command=command_line(self.argv),
            argv=self.argv, cwd=os.getcwd(), versions=versions(), machine=machine(), calibration=source.about,
            strategy=strategy, what=decisions.describe(), method=decisions.method,
            decisions=decisions.file_name,
            results=Results(layers=[source.layers, done.model.config.num_hidden_layers],
                            parameters=[source.parameters,
                                        decisions.method.get("parameters_effective", count_parameters(done.model))],
                            perplexity=perplexity, latency=latency, latency_ratios=ratios,
                            compression_seconds=done.seconds, peak_memory_gib=done.peak_memory_bytes / 2**30))


class _Original:
    """What the record keeps of the model as loaded (read before the compression changes it), and the
    calibration it is compressed with."""

    def __init__(self, model, calibration: torch.Tensor, about: dict):
        from flatten.models.loading import count_parameters
        from flatten.run.report import weights_sha256

        self.sha256, self.layers, self.parameters = weights_sha256(model), model.config.num_hidden_layers, \
            count_parameters(model)
        self.calibration, self.about = calibration, about


def check_output(out: Path, overwrite: bool) -> Path:
    """``out``, checked before any work: it may be written (replaced only with ``overwrite``)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it, or write elsewhere")
    blocking = next((p for p in out.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise FileExistsError(f"cannot write {out}: {blocking} is a file, not a folder")
    return out
